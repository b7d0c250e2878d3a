"""A PACS that misbehaves on purpose, for the retrieval tests: a Study Root Q/R SCP built on
pynetdicom (a real implementation over real sockets) holding a few synthetic data sets.

``mode``:
- ``drop_first``: the first C-MOVE sends all but one of its instances and answers success
  (the other sub-operations' counts say so); later ones behave;
- ``lie``: every C-MOVE answers success having sent nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.peers import free_port

_LEVEL_KEYS = {
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_MATCHED = ("AccessionNumber", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")


@dataclass
class FlakyPacs:
    datasets: Sequence[Dataset]
    destination_port: int
    mode: str = "drop_first"
    ae_title: str = "FLAKY"
    port: int = field(default_factory=free_port)
    moves: int = 0
    image_finds: int = 0
    server: Any = None

    def start(self) -> FlakyPacs:
        ae = AE(ae_title=self.ae_title)
        for sop in (
            Verification,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove,
        ):
            ae.add_supported_context(sop)
        ae.add_requested_context(MRImageStorage)
        ae.add_requested_context(CTImageStorage)
        handlers = [(evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def _matching(self, identifier: Dataset) -> list[Dataset]:
        found = []
        for ds in self.datasets:
            ok = True
            for key in _MATCHED:
                wanted = identifier.get(key)
                if wanted not in (None, "") and str(ds.get(key, "")) != str(wanted):
                    ok = False
            uids = identifier.get("SOPInstanceUID")
            if uids not in (None, ""):
                wanted_uids = [uids] if isinstance(uids, str) else list(uids)
                ok = ok and str(ds.SOPInstanceUID) in wanted_uids
            if ok:
                found.append(ds)
        return found

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        identifier = event.identifier
        level = str(identifier.QueryRetrieveLevel)
        self.image_finds += level == "IMAGE"
        unique = _LEVEL_KEYS[level]
        seen: set[str] = set()
        for ds in self._matching(identifier):
            key = str(ds.get(unique))
            if key in seen:
                continue
            seen.add(key)
            answer = Dataset()
            answer.QueryRetrieveLevel = level
            for elem in identifier:
                if elem.keyword == "NumberOfSeriesRelatedInstances":
                    answer.NumberOfSeriesRelatedInstances = sum(
                        str(d.SeriesInstanceUID) == key for d in self.datasets
                    )
                elif elem.keyword and elem.keyword != "QueryRetrieveLevel":
                    setattr(answer, elem.keyword, ds.get(elem.keyword, ""))
            yield 0xFF00, answer
        yield 0x0000, None

    def _move(self, event: Any) -> Iterator[Any]:
        self.moves += 1
        yield "127.0.0.1", self.destination_port
        matches = self._matching(event.identifier)
        if self.mode == "lie":
            yield 0
            return
        if self.mode == "drop_first" and self.moves == 1:
            matches = matches[:-1]
        yield len(matches)
        for ds in matches:
            yield 0xFF00, ds
