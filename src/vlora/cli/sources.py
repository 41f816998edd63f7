"""Where the command line reads adapters from.

An adapter argument is a local folder (or weights file), a Hugging Face Hub id
``org/name`` or ``org/name@revision`` (a branch, tag or commit hash), or, for
``compress --ray`` only, an fsspec URL (``s3://``, ``memory://``, ``hf://``, ...) that the
Ray workers read. An existing local path always wins: ``org/name`` is read from the Hub
only when no such path exists here. Anything else is a usage error naming the argument.

Hub adapters are fetched with huggingface_hub into its cache (``HF_HUB_CACHE``); with
``HF_HUB_OFFLINE=1`` they are read from that cache only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import click

from vlora.io import hub_adapter_dir

# Hub repository ids: "org/name", each part letters, digits, "_", "-" and ".", neither
# starting nor ending with "-" or "." and without "--" or ".." (huggingface_hub's rules).
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[A-Za-z0-9_][A-Za-z0-9_./-]*))?")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
MAX_REPO_ID = 96

HELP = ("ADAPTERS: folders (or weights files), or Hugging Face Hub ids org/name[@revision] "
        "(fetched into the Hugging Face cache; with HF_HUB_OFFLINE=1 read from it only); an "
        "existing local path wins over a Hub id.")


@dataclass(frozen=True)
class Source:
    """One adapter argument: ``given`` as typed, and what it is (``path``, ``hub``, ``url``)."""

    given: str
    kind: str
    repo_id: str | None = None
    revision: str | None = None

    @property
    def task_id(self) -> str:
        """Its default task id: the folder's (or URL's) last part, a Hub repository's name."""
        if self.kind == "hub":
            return self.repo_id.split("/")[1]
        return Path(self.given.rstrip("/")).name

    def local(self) -> str:
        """A local path to read it from: a Hub adapter's snapshot folder in the Hugging Face
        cache (downloaded unless offline), a path or URL as given."""
        if self.kind == "hub":
            return str(hub_adapter_dir(self.repo_id, self.revision))
        return self.given


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``text`` is ``org/name`` or ``org/name@revision``."""
    m = _HUB_ID.fullmatch(text)
    if m is None or len(m["repo"]) > MAX_REPO_ID or ".." in text or "--" in m["repo"] \
            or (m["revision"] or "").endswith("/"):
        return None
    return m["repo"], m["revision"]


def is_url(text: str) -> bool:
    return _URL.match(text) is not None


def classify(text: str) -> Source:
    """What ``text`` names: an existing path first, then a URL, then a Hub id; a ValueError
    saying so when it is none of them."""
    if os.path.exists(text):
        return Source(text, "path")
    if is_url(text):
        return Source(text, "url")
    hub = parse_hub_id(text)
    if hub is not None:
        return Source(text, "hub", *hub)
    raise ValueError(f"{text!r}: no such file or folder here, and not a Hugging Face Hub id "
                     "(org/name or org/name@revision)")


class AdapterSource(click.ParamType):
    """A click type for adapter arguments: converts each to a :class:`Source` (nothing is
    fetched yet; :meth:`Source.local` does that once every option has been checked)."""

    name = "adapter"

    def __init__(self, urls: bool = False):
        self.urls = urls

    def convert(self, value, param, ctx) -> Source:
        if isinstance(value, Source):
            return value
        try:
            source = classify(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if source.kind == "url" and not self.urls:
            self.fail(f"{value!r}: an fsspec URL; only 'vlora compress --ray' reads adapters "
                      "from URLs: copy the adapter to a local folder first", param, ctx)
        return source


def require_no_urls(sources: list[Source], why: str) -> None:
    """A usage error for the first URL among ``sources`` (read only ``why`` allows)."""
    urls = [s.given for s in sources if s.kind == "url"]
    if urls:
        raise click.UsageError(f"{urls[0]}: an fsspec URL; {why}")


def any_hub(sources: list[Source]) -> bool:
    """Whether any of ``sources`` is a Hub id: then default task ids come from the
    arguments (a Hub adapter's snapshot folder is named by its commit hash)."""
    return any(s.kind == "hub" for s in sources)
