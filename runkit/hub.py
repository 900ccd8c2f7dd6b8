"""The Hugging Face hub as every loader meets it: `HF_HUB_OFFLINE` read when a load fails (not when
huggingface_hub was imported, so a test or a user setting it later is honoured), and the one sentence that
tells a user what to do when weights could not be had."""

from __future__ import annotations

import os


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks every loader to read its local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def unreachable_advice(local_fix: str) -> str:
    """What to do when a hub download failed: online, check the id and the network; offline, unset
    HF_HUB_OFFLINE or use a local copy (`local_fix` says where the path goes)."""
    if hub_offline():
        return ("HF_HUB_OFFLINE is set, so only the local cache was read: unset it to download, or "
                f"{local_fix}")
    return f"Check the name and your network, or {local_fix}"
