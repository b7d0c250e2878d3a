"""Typed, frozen configuration objects.

The JSON Schemas in ``schemas/`` are the one description of what a config file may say; these
dataclasses are what the rest of the engine reads after a file has passed its schema. They are
built only by :mod:`engine.config.loader`, which applies the schema defaults first, so every field
here has a value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from engine.config.pacs import PacsConfig


class DuplicatePolicy(StrEnum):
    """What to do when a SOP Instance UID arrives again with different bytes.

    Identical bytes are always a no-op; this policy only decides the conflicting case.
    """

    KEEP_FIRST = "keep_first"
    REPLACE = "replace"
    QUARANTINE = "quarantine"


@dataclass(frozen=True)
class TlsConfig:
    """Optional TLS for the Storage SCP (PEM files)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class Limits:
    """Resource limits the receiver enforces before acknowledging an instance.

    ``min_free_disk_mb``: below this many MiB free in the data dir, C-STORE answers 0xA700.
    ``max_instance_mb``: a larger dataset is refused with 0xA700 (protects the spool); counted
    as it arrives, so no more than this is ever held for one association.
    ``max_associations``, ``max_associations_per_peer``: connections at once, in all and from
    one IP address; more are refused at once (A-ASSOCIATE-RJ, transient).
    """

    min_free_disk_mb: int = 1024
    max_instance_mb: int = 4096
    max_associations: int = 32
    max_associations_per_peer: int = 8


@dataclass(frozen=True)
class Timeouts:
    """Network timeouts in seconds.

    ``acse``: the whole deadline for association set-up (TLS handshake and A-ASSOCIATE-RQ),
    however slowly the bytes come. ``network``: the idle limit on an association's reads.
    """

    acse: float = 30.0
    dimse: float = 60.0
    network: float = 120.0


class UnroutedPolicy(StrEnum):
    """What happens to a study no project claims."""

    QUARANTINE = "quarantine"
    IGNORE = "ignore"


class AmbiguousPolicy(StrEnum):
    """What happens to a study several projects claim."""

    ALL = "all"
    QUARANTINE = "quarantine"


@dataclass(frozen=True)
class RoutingPolicy:
    """Site-wide routing policy.

    ``unrouted_after``: seconds without a new instance before an unclaimed study is judged.
    ``classify_rulesets``: rule set names or files (relative to the site file) labelling every
    series on arrival; empty means every rule set in ``rulesets/classify/``.
    """

    unrouted: UnroutedPolicy = UnroutedPolicy.QUARANTINE
    ambiguous: AmbiguousPolicy = AmbiguousPolicy.ALL
    unrouted_after: float = 300.0
    classify_rulesets: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeartbeatConfig:
    """The heartbeat job (:mod:`engine.manage.heartbeat`).

    ``interval``, ``echo_timeout``, ``url_timeout``: seconds. ``keep``: heartbeat rows kept in
    the index. ``calling_ae``: the C-ECHO's calling AE title (None: the site's own). ``url``:
    where each heartbeat is POSTed as JSON (None: nowhere).
    """

    interval: float = 60.0
    keep: int = 1440
    echo_timeout: float = 10.0
    calling_ae: str | None = None
    url: str | None = None
    url_timeout: float = 10.0


@dataclass(frozen=True)
class NodeConfig:
    """This process as a node of a cluster (:mod:`engine.store.nodes`).

    ``name``: its id (None: ``<host>/<pid>``). ``lease_seconds``: how long a claim lasts
    without renewal.
    """

    name: str | None = None
    lease_seconds: float = 60.0


@dataclass(frozen=True)
class RetentionPolicy:
    """The retention job (:mod:`engine.manage.retention`).

    ``interval``: seconds between runs. ``min_free_percent``: below this percentage of free disk
    in the data folder, already-sent studies are evicted oldest first (0: off).
    """

    interval: float = 3600.0
    min_free_percent: float = 10.0


@dataclass(frozen=True)
class DeidSettings:
    """Site-wide de-identification settings. ``date_languages``: ISO 639-1 codes whose month
    names the verification gate searches in written birth dates, besides English."""

    date_languages: tuple[str, ...] = ()


@dataclass(frozen=True)
class StatusHttp:
    """The read-only status page of ``fiona serve``; ``port`` 0 means off."""

    port: int = 0
    bind: str = "127.0.0.1"


@dataclass(frozen=True)
class LdapSearch:
    """A search of the directory: the subtree under ``base``, with ``filter`` (RFC 4515) whose
    ``{username}`` and ``{user_dn}`` are replaced by escaped values."""

    base: str
    filter: str


@dataclass(frozen=True)
class LdapRoleRule:
    """One entry of ``web.ldap.role_map``: members of ``group`` (a DN) get ``role`` (admin,
    coordinator, viewer; None: no role) on ``projects``, and the phi grant when ``phi``."""

    group: str
    role: str | None = None
    projects: tuple[str, ...] = ()
    phi: bool = False


@dataclass(frozen=True)
class LdapConfig:
    """Portal logins checked against an LDAP directory or Active Directory (``web.ldap``).

    ``urls`` are tried in order; ``timeout`` is in seconds. The user's DN comes from
    ``user_search`` (as the ``bind_dn`` service account, whose password is the first line of
    ``bind_password_file``, or anonymously) or from ``user_dn_template``; its groups from
    ``group_search``, or the user entry's ``memberOf`` when that is None.
    """

    urls: tuple[str, ...]
    role_map: tuple[LdapRoleRule, ...]
    start_tls: bool = False
    ca_file: Path | None = None
    timeout: float = 10.0
    bind_dn: str | None = None
    bind_password_file: Path | None = None
    user_search: LdapSearch | None = None
    user_dn_template: str | None = None
    group_search: LdapSearch | None = None


@dataclass(frozen=True)
class WebConfig:
    """The web portal and API of ``fiona serve`` (``/api/v1``): on unless ``enabled`` is false
    (``fiona serve --web-port 0``); HTTPS
    when both ``cert_file`` and ``key_file`` (PEM) are given. A portal login session ends after
    ``session_idle_minutes`` without a request or ``session_max_hours`` after the login.
    ``upload_max_mb``: MiB, the largest file a test-a-file upload may be. ``trusted_proxies``:
    addresses or networks of reverse proxies whose ``X-Forwarded-For``/``-Proto`` headers are
    believed (none by default: the headers are ignored). ``ldap``: logins of people who are not
    local users checked against a directory (None: local users only)."""

    enabled: bool = True
    port: int = 8080
    bind: str = "127.0.0.1"
    cert_file: Path | None = None
    key_file: Path | None = None
    session_idle_minutes: float = 30.0
    session_max_hours: float = 12.0
    upload_max_mb: float = 512.0
    trusted_proxies: tuple[str, ...] = ()
    ldap: LdapConfig | None = None


@dataclass(frozen=True)
class LogFile:
    """An optional log file besides stderr, rotated by size: ``path`` (None: stderr only),
    ``max_mb`` (MiB before it is rotated), ``backups`` (rotated files kept: ``fiona.log.1``...)."""

    path: Path | None = None
    max_mb: float = 10.0
    backups: int = 5


@dataclass(frozen=True)
class SiteConfig:
    """The site config: one per installation (``--config SITE.yaml``; embedded defaults if none).

    ``allowed_calling_aes``: empty means every calling AE title is accepted.
    ``max_pdu``: the maximum PDU length (bytes) advertised to peers and enforced (a longer
    PDU aborts the association); 0 means unlimited.
    ``index_url``: ``sqlite:///PATH``, empty for ``<data_dir>/index.sqlite``, or
    ``postgresql://USER@HOST:PORT/DB`` (``$FIONA_INDEX_URL`` overrides it where the index is
    opened, :func:`engine.store.db.resolve_index_url`).
    ``reuse_port``: the SCP's port may be shared with other fiona processes (``SO_REUSEPORT``).
    ``pacs``: the remote PACS fiona queries and retrieves from (:mod:`engine.config.pacs`).
    """

    source: Path | None = None
    ae_title: str = "FIONA"
    port: int = 11112
    bind_address: str = "127.0.0.1"
    reuse_port: bool = False
    data_dir: Path = Path("var")
    projects_dir: Path = Path("projects")
    index_url: str = ""
    allowed_calling_aes: tuple[str, ...] = ()
    max_pdu: int = 1048576
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    tls: TlsConfig = field(default_factory=TlsConfig)
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    scan_interval: float = 2.0
    log_level: str = "INFO"
    log_file: LogFile = field(default_factory=LogFile)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    deidentification: DeidSettings = field(default_factory=DeidSettings)
    status_http: StatusHttp = field(default_factory=StatusHttp)
    web: WebConfig = field(default_factory=WebConfig)
    pacs: tuple[PacsConfig, ...] = ()

    def pacs_named(self, name: str) -> PacsConfig | None:
        """The ``pacs`` entry called ``name`` (None when there is none)."""
        return next((p for p in self.pacs if p.name == name), None)

    @property
    def index_path(self) -> Path:
        """Path of the SQLite index file resolved from ``index_url`` and ``data_dir``."""
        prefix = "sqlite:///"
        if self.index_url.startswith(prefix):
            return Path(self.index_url[len(prefix) :])
        return self.data_dir / "index.sqlite"


@dataclass(frozen=True)
class ProjectConfig:
    """One research project, read from one file in ``projects/``.

    ``raw`` keeps the validated document (defaults applied) so later layers (rules, pipeline,
    destinations) can read their own sections without this class knowing their shape.
    """

    name: str
    source: Path
    description: str = ""
    enabled: bool = True
    raw: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
