"""The receiver answers an A-ASSOCIATE-RQ it has seen before from its kept answer
(:class:`engine.net.upper.Negotiations`): the same contexts, the same A-ASSOCIATE-AC, without
decoding and negotiating it again; requests that differ get answers of their own."""

from __future__ import annotations

from pynetdicom import StoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from engine.net.scp import supported_contexts
from engine.net.upper import AcceptorConfig, Negotiations

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def _request(calling: str, n_contexts: int) -> bytes:
    """The body of an A-ASSOCIATE-RQ proposing ``n_contexts`` storage classes."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "FIONA"
    contexts = []
    for i, cx in enumerate(StoragePresentationContexts[10 : 10 + n_contexts]):
        context = build_context(cx.abstract_syntax, [EXPLICIT, IMPLICIT])
        context.context_id = 2 * i + 1
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return bytes(rq.encode()[6:])


def test_a_request_seen_before_gets_the_kept_answer() -> None:
    negotiations = Negotiations(AcceptorConfig(contexts=supported_contexts()))
    body = _request("ORTHANC", 40)
    first = negotiations.answer(body)
    assert (first.calling_ae, first.called_ae, first.proposed) == ("ORTHANC", "FIONA", 40)
    fresh = Negotiations(AcceptorConfig(contexts=supported_contexts())).answer(body)
    assert first.contexts.keys() == fresh.contexts.keys() and len(first.contexts) > 30
    assert first.ac == fresh.ac
    assert all(cx.transfer_syntax[0] in (EXPLICIT, IMPLICIT) for cx in first.contexts.values())
    ac = A_ASSOCIATE_AC()
    ac.decode(first.ac)
    assert str(ac.calling_ae_title).strip() == "ORTHANC"
    assert negotiations.answer(bytes(body)) is first  # not worked out again
    other = negotiations.answer(_request("MODALITY", 3))
    assert (other.calling_ae, other.proposed) == ("MODALITY", 3)


def test_at_most_size_requests_are_kept_the_oldest_dropped_first() -> None:
    negotiations = Negotiations(AcceptorConfig(contexts=supported_contexts()))
    bodies = [_request(f"AE{i}", 1) for i in range(Negotiations.SIZE + 1)]
    answers = [negotiations.answer(b) for b in bodies]
    assert negotiations.answer(bodies[-1]) is answers[-1]
    assert negotiations.answer(bodies[0]) is not answers[0]  # dropped, worked out again
    assert negotiations.answer(bodies[0]).calling_ae == "AE0"
