"""The audit chain anchored outside the database.

A checkpoint records the chain's head (sequence number, running hash, record count) at a
moment, signed with an Ed25519 key the database does not hold (derived from
``RDC_SECRET_KEY`` with HKDF, or read from ``RDC_AUDIT_CHECKPOINT_KEY_FILE``), and is kept as
JSON in the object store under ``audit/checkpoints/``. Someone who can write the database
can rewrite the records and re-hash the chain, or cut its end off, but cannot sign a
checkpoint that matches: :func:`verify_trail` finds both. Each checkpoint names the one
before it, so a checkpoint removed from the store is found too (except the newest).

The outcome of the last verification is kept in the store as well
(``audit/verification/latest.json``), where ``/readyz`` and ``/metrics`` of every replica
read it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select
from sqlalchemy.orm import Session

from rdc_core.errors import ConfigurationError, NotFoundError
from rdc_core.settings import Settings
from rdc_core.storage import ObjectStore
from worklist.access import Principal, require_roles
from worklist.audit import AuditSeal, ChainReport, CheckpointRef, check_chain, record_access
from worklist.models import Role

__all__ = [
    "CHECKPOINT_PREFIX",
    "STATUS_KEY",
    "Checkpoint",
    "VerificationStatus",
    "authorize_verification",
    "checkpoint_signing_key",
    "load_status",
    "save_status",
    "verify_trail",
    "write_checkpoint",
]

CHECKPOINT_PREFIX = "audit/checkpoints/"
STATUS_KEY = "audit/verification/latest.json"
_FORMAT = "rdc-audit-checkpoint/1"


VERIFIERS = frozenset({Role.QC, Role.ADMIN})


def authorize_verification(session: Session, *, principal: Principal) -> None:
    """Only the lead hospital's QC and administrators verify the trail (audited)."""
    require_roles(principal, VERIFIERS, lead_only=True)
    record_access(session, principal, action="verify", object_type="audit_trail")


def checkpoint_signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The key checkpoints are signed with: the configured key file, else derived from the
    secret key (which lives in the environment or the data directory, not the database)."""
    if settings.audit_checkpoint_key_file is not None:
        try:
            key = serialization.load_pem_private_key(
                settings.audit_checkpoint_key_file.read_bytes(), password=None
            )
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"RDC_AUDIT_CHECKPOINT_KEY_FILE: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigurationError("RDC_AUDIT_CHECKPOINT_KEY_FILE must hold an Ed25519 key")
        return key
    seed = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"rdc audit checkpoint",
        info=b"ed25519 signing key v1",
    ).derive(settings.token_secret().encode("utf-8"))
    return Ed25519PrivateKey.from_private_bytes(seed)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The chain's head at one moment, as signed."""

    seq: int
    head_hash: str
    count: int
    created_at: str  # ISO 8601, UTC
    previous_seq: int | None  # the checkpoint before this one

    @property
    def key(self) -> str:
        return f"{CHECKPOINT_PREFIX}{self.seq:020d}.json"

    def payload(self) -> bytes:
        return json.dumps(
            {"format": _FORMAT, **asdict(self)}, sort_keys=True, separators=(",", ":")
        ).encode("utf-8")


def _public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def write_checkpoint(
    session: Session, *, store: ObjectStore, key: Ed25519PrivateKey, now: datetime
) -> Checkpoint | None:
    """Sign the head of the sealed chain and store it; None when the chain is empty or
    its head has a checkpoint already."""
    head = session.execute(
        select(AuditSeal.seq, AuditSeal.hash, AuditSeal.records)
        .order_by(AuditSeal.seq.desc())
        .limit(1)
    ).one_or_none()
    if head is None:
        return None
    keys = list(store.iter_keys(CHECKPOINT_PREFIX))
    previous = max((s for s in map(_seq_of, keys) if s is not None), default=None)
    if previous is not None and previous >= head.seq:
        return None
    checkpoint = Checkpoint(
        seq=head.seq,
        head_hash=head.hash,
        count=head.records,
        created_at=now.isoformat(),
        previous_seq=previous,
    )
    body = {
        "checkpoint": json.loads(checkpoint.payload()),
        "signature": base64.b64encode(key.sign(checkpoint.payload())).decode("ascii"),
        "public_key": _public_hex(key.public_key()),
    }
    store.put_bytes(checkpoint.key, json.dumps(body, indent=1).encode("utf-8"))
    return checkpoint


def _seq_of(key: str) -> int | None:
    name = key.removeprefix(CHECKPOINT_PREFIX).removesuffix(".json")
    return int(name) if name.isdigit() else None


@dataclass(frozen=True, slots=True)
class _Problem:
    seq: int
    reason: str


def _load_checkpoints(
    store: ObjectStore, public_key: Ed25519PublicKey
) -> tuple[list[CheckpointRef], list[_Problem]]:
    refs: list[CheckpointRef] = []
    problems: list[_Problem] = []
    previous: dict[int, int | None] = {}
    for object_key in store.iter_keys(CHECKPOINT_PREFIX):
        seq = _seq_of(object_key)
        if seq is None:
            continue
        try:
            with store.open(object_key) as stream:
                body = json.loads(stream.read())
            signed = Checkpoint(**{k: v for k, v in body["checkpoint"].items() if k != "format"})
            public_key.verify(base64.b64decode(body["signature"]), signed.payload())
        except InvalidSignature:
            problems.append(
                _Problem(seq, f"checkpoint {object_key} is not signed with this deployment's key")
            )
            continue
        except (NotFoundError, ValueError, KeyError, TypeError) as exc:
            problems.append(_Problem(seq, f"checkpoint {object_key} is unreadable: {exc}"))
            continue
        if signed.seq != seq:
            problems.append(_Problem(seq, f"checkpoint {object_key} was renamed"))
            continue
        previous[seq] = signed.previous_seq
        refs.append(
            CheckpointRef(
                seq=seq,
                head_hash=signed.head_hash,
                count=signed.count,
                created_at=signed.created_at,
                key=object_key,
            )
        )
    for seq, before in previous.items():
        if before is not None and before not in previous:
            problems.append(
                _Problem(
                    before,
                    f"checkpoint of seq {before} (named by the one of seq {seq}) is missing "
                    "from the store",
                )
            )
    return refs, problems


def verify_trail(session: Session, *, store: ObjectStore, key: Ed25519PrivateKey) -> ChainReport:
    """Check the chain in the database against itself and every stored checkpoint."""
    refs, problems = _load_checkpoints(store, key.public_key())
    report = check_chain(session, checkpoints=refs)
    if not problems:
        return report
    first = min(problems, key=lambda p: p.seq)
    if (
        not report.intact
        and report.first_bad_seq is not None
        and (report.first_bad_seq <= first.seq)
    ):
        return report
    return ChainReport(
        intact=False,
        first_bad_seq=first.seq,
        reason=first.reason,
        sealed_through=report.sealed_through,
        records=report.records,
        unsealed=report.unsealed,
        checkpoints=report.checkpoints,
        last_checkpoint_seq=report.last_checkpoint_seq,
    )


@dataclass(frozen=True, slots=True)
class VerificationStatus:
    """The outcome of the last verification, as /readyz and /metrics show it."""

    intact: bool
    checked_at: str
    first_bad_seq: int | None
    reason: str | None
    sealed_through: int
    records: int
    checkpoints: int

    @property
    def checked_at_timestamp(self) -> float:
        return datetime.fromisoformat(self.checked_at).timestamp()


def save_status(store: ObjectStore, report: ChainReport, *, now: datetime) -> VerificationStatus:
    """Keep the outcome of a verification where every replica reads it."""
    status = VerificationStatus(
        intact=report.intact,
        checked_at=now.isoformat(),
        first_bad_seq=report.first_bad_seq,
        reason=report.reason,
        sealed_through=report.sealed_through,
        records=report.records,
        checkpoints=report.checkpoints,
    )
    store.put_bytes(STATUS_KEY, json.dumps(asdict(status)).encode("utf-8"))
    return status


def load_status(store: ObjectStore) -> VerificationStatus | None:
    """The outcome of the last verification; None before the first one."""
    try:
        with store.open(STATUS_KEY) as stream:
            return VerificationStatus(**json.loads(stream.read()))
    except NotFoundError:
        return None
