"""Vendor codecs: a vendor's native JSON → native readings of CONTRACT §2.

A codec is `decode(document, device) -> list[(channel, native_dict)]` where channel is
"telemetry" or "event" and native_dict is what the device would have published on
`gw/dev/{id}/{channel}` (validated by the same models afterwards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ingest.decode import DeviceInfo


class CodecError(ValueError):
    """The vendor payload cannot be mapped; the message says why."""


Codec = Callable[[Any, "DeviceInfo"], list[tuple[str, dict[str, Any]]]]
CODECS: dict[str, Codec] = {}

# Registered last: the codec modules import CodecError from this package.
from ingest.codecs import chirpstack, hikvision, zigbee2mqtt  # noqa: E402

CODECS.update({
    chirpstack.NAME: chirpstack.decode,
    hikvision.NAME: hikvision.decode,
    zigbee2mqtt.NAME: zigbee2mqtt.decode,
})  # fmt: skip
