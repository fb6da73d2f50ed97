"""Names that are local paths or Hugging Face hub ids, and whether the hub can be reached: asked
once, without retries, so that a machine without network fails in a second instead of after the
libraries' minute of retrying."""

from __future__ import annotations

import os
from functools import cache


def looks_local(name: str) -> bool:
    """A path rather than a hub id ("name" or "owner/name"): an existing path, a leading ".", "/"
    or "~", a backslash, or more than one "/"."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.exists(name)


def offline() -> bool:
    """HF_HUB_OFFLINE is set: the libraries read their caches only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


@cache
def unreachable() -> str | None:
    """Why the hub cannot be reached (one HEAD request, 5 s timeout, no retries), or None."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as error:  # noqa: BLE001 (any transport error means: no hub)
        return f"{constants.ENDPOINT} cannot be reached: {error}"
    return None


def model_in_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
