"""Stacks and images.

A stack is a folder ``stacks/<name>/`` holding ``Dockerfile.fragment`` and ``markers``.
Adding a stack means adding such a folder; no code changes. Images are tagged by a hash
of every input file and build argument, so an image is built only when an input changed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

# Ties between stacks with equally many marker hits are broken by this order; stacks not
# listed come after, alphabetically.
STACK_ORDER = ("python", "node", "go", "rust", "jvm", "ruby")


def docker_dir() -> Path:
    """The shipped ``docker/`` folder: inside the wheel, or the checkout's own."""
    shipped = Path(str(resources.files("podbay"))) / "_docker"
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parents[2] / "docker"


@dataclass(frozen=True)
class Stack:
    name: str
    folder: Path
    markers: tuple[str, ...]

    @property
    def fragment(self) -> str:
        return (self.folder / "Dockerfile.fragment").read_text(encoding="utf-8")


def _read_markers(path: Path) -> tuple[str, ...]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    )


def discover_stacks(extra_dirs: Iterable[Path] = ()) -> dict[str, Stack]:
    """Shipped stacks plus those in ``extra_dirs`` (a later folder overrides an earlier one)."""
    found: dict[str, Stack] = {}
    for root in (docker_dir() / "stacks", *(Path(d).expanduser() for d in extra_dirs)):
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            fragment, markers = folder / "Dockerfile.fragment", folder / "markers"
            if folder.is_dir() and fragment.is_file() and markers.is_file():
                found[folder.name] = Stack(folder.name, folder, _read_markers(markers))
    order = {name: i for i, name in enumerate(STACK_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


@dataclass(frozen=True)
class Detection:
    stack: str | None
    reason: str
    hits: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def detect_stack(path: Path, stacks: Mapping[str, Stack]) -> Detection:
    """Pick the stack whose markers match most files at the top of ``path``."""
    try:
        names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    except OSError:
        names = []
    hits: dict[str, tuple[str, ...]] = {}
    for stack in stacks.values():
        matched = tuple(m for m in stack.markers if any(fnmatch.fnmatch(n, m) for n in names))
        if matched:
            hits[stack.name] = matched
    if not hits:
        return Detection(None, "no stack markers found, so the base image is used")
    best = max(len(m) for m in hits.values())
    # stacks is in tie-break order, so the first with the most hits wins.
    winner = next(name for name in stacks if len(hits.get(name, ())) == best)
    reason = f"detected from {', '.join(hits[winner])}"
    rivals = [n for n in hits if n != winner]
    if rivals:
        others = ", ".join(f"{n} ({len(hits[n])})" for n in rivals)
        reason += f"; also matched {others}, fewer or later in the fixed order"
    return Detection(winner, reason, hits)


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to build one image; ``tag`` hashes all of it."""

    repository: str
    dockerfile: str
    context: Path
    buildargs: Mapping[str, str]
    files: tuple[Path, ...]
    # Generated context members: (path in the context, content).
    extra: tuple[tuple[str, bytes], ...] = ()
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        # Hashed once, when the spec is made: the tag names these inputs as they were then.
        object.__setattr__(self, "digest", self._hash())

    @property
    def tag(self) -> str:
        return f"{self.repository}:{self.digest}"

    def _hash(self) -> str:
        h = hashlib.sha256()
        h.update(self.dockerfile.encode())
        for key in sorted(self.buildargs):
            h.update(f"\0arg {key}={self.buildargs[key]}".encode())
        for path in self.files:
            h.update(f"\0file {path.relative_to(self.context)}\0".encode())
            h.update(path.read_bytes())
        for name, content in self.extra:
            h.update(f"\0extra {name}\0".encode())
            h.update(content)
        return h.hexdigest()[:12]


def _context_files(context: Path, skip: Sequence[str] = ()) -> tuple[Path, ...]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(context):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files.extend(Path(dirpath) / f for f in sorted(filenames))
    return tuple(files)


def base_image_spec(
    base_image: str, uid: int, gid: int, extra_ca_certs: Iterable[Path] = ()
) -> ImageSpec:
    root = docker_dir()
    dockerfile = (root / "Dockerfile.base").read_text(encoding="utf-8")
    files = tuple(
        p
        for p in _context_files(root, skip=("stacks",))
        if p.name != "Dockerfile.base" and p.suffix != ".md" and p.name != ".keep"
    )
    return ImageSpec(
        repository="podbay-base",
        dockerfile=dockerfile,
        context=root,
        buildargs={"BASE_IMAGE": base_image, "DEV_UID": str(uid), "DEV_GID": str(gid)},
        files=files,
        extra=tuple(
            (f"extra-ca/podbay-extra-{i}.crt", Path(cert).expanduser().read_bytes())
            for i, cert in enumerate(extra_ca_certs)
        ),
    )


def stack_image_spec(base: ImageSpec, stack: Stack) -> ImageSpec:
    fragment = stack.fragment
    dockerfile = (
        "ARG PODBAY_BASE\nFROM ${PODBAY_BASE}\nUSER root\n"
        f"{fragment.rstrip()}\n"
        "USER dev\nWORKDIR /workspace\n"
    )
    buildargs = {"PODBAY_BASE": base.tag}
    # Only a fragment that asks for it gets the mirror: the others' tags stay the same
    # from one machine to the next.
    if _DECLARES_MIRROR.search(fragment):
        buildargs["DEBIAN_MIRROR"] = debian_mirror()
    return ImageSpec(
        repository=f"podbay-{stack.name}",
        dockerfile=dockerfile,
        context=stack.folder,
        buildargs=buildargs,
        files=_context_files(stack.folder),
    )


_DECLARES_MIRROR = re.compile(r"^\s*ARG\s+DEBIAN_MIRROR\b", re.MULTILINE)
# Debian's suite names (codenames and aliases): a host's Ubuntu or other sources are no
# mirror for a Debian image.
_DEBIAN_SUITES = frozenset(
    [
        "buster",
        "bullseye",
        "bookworm",
        "trixie",
        "forky",
        "duke",
        "sid",
        "stable",
        "testing",
        "unstable",
        "oldstable",
        "oldoldstable",
    ]
)


def debian_mirror(apt_etc: Path = Path("/etc/apt")) -> str:
    """The Debian mirror for image builds: ``$PODBAY_DEBIAN_MIRROR``, else the host's apt
    sources' (empty when the host has none). No mirror is hard-coded anywhere."""
    return os.environ.get("PODBAY_DEBIAN_MIRROR") or host_debian_mirrors(apt_etc)[0]


def host_debian_mirrors(apt_etc: Path = Path("/etc/apt")) -> tuple[str, str]:
    """(main, security) Debian mirror URLs in ``apt_etc``'s sources, "" for one not found.

    Reads ``sources.list.d/*.sources`` (deb822) and then ``sources.list`` and
    ``sources.list.d/*.list`` (one-line form), like apt; the first ``deb`` entry for a Debian
    suite wins. ``scripts/ensure-docker --print-mirror`` does the same in shell.
    """
    entries: list[tuple[str, list[str]]] = []  # (uri, suites) of each deb entry, in order
    parts = apt_etc / "sources.list.d"
    for path in sorted(parts.glob("*.sources")) if parts.is_dir() else []:
        for paragraph in re.split(r"\n\s*\n", _read(path)):
            fields: dict[str, str] = {}
            for line in paragraph.splitlines():
                key, colon, value = line.partition(":")
                if colon and not line.startswith(("#", " ", "\t")):
                    fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            suites = fields.get("suites", "").split()
            entries += [(uri, suites) for uri in fields.get("uris", "").split()]
    lists = [apt_etc / "sources.list"]
    lists += sorted(parts.glob("*.list")) if parts.is_dir() else []
    for path in lists:
        for line in _read(path).splitlines():
            words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]]))
    main = security = ""
    for uri, suites in entries:
        for suite in suites:
            codename, _, kind = suite.partition("-")
            if codename not in _DEBIAN_SUITES:
                continue
            if kind == "security" and not security:
                security = uri
            elif kind != "security" and not main:
                main = uri
    return main, security


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def dev_ids() -> tuple[int, int]:
    """uid/gid of the container user: podbay's own, or 1000 when podbay runs as root."""
    uid, gid = os.getuid(), os.getgid()
    return (1000, 1000) if uid == 0 else (uid, gid)


def progress_line(line: str, limit: int = 120) -> str:
    """A build output line for a progress message: at most ``limit`` characters, cut between
    words with "…" (a word longer than the whole limit is cut inside it)."""
    line = " ".join(line.split())
    if len(line) <= limit:
        return line
    head = line[: limit - 1]
    space = head.rfind(" ")
    # The next character being a space means head ends on a whole word already.
    if line[limit - 1] != " " and space > 0:
        head = head[:space]
    return head.rstrip() + "…"
