"""Device simulator: a fleet of smoke detectors, manhole covers, door access controllers
and smart bins publishing CONTRACT §2/§3 MQTT messages, with injectable scenarios (fire,
cover opened, door forced, full or burning bins, faulty and hostile devices)."""

from device_sim.engine import Outgoing, SimOptions, Simulation, Step
from device_sim.fleet import FleetStats, parse_mqtt_url, run_fleet, synthetic_fleet
from device_sim.scenarios import SCENARIOS, make_scenarios
from device_sim.spec import (
    DEVICE_KINDS,
    DeviceFileError,
    DeviceKind,
    DeviceSpec,
    load_devices,
    load_devices_from_csv,
    load_devices_from_json,
)

__all__ = [
    "DEVICE_KINDS",
    "SCENARIOS",
    "DeviceFileError",
    "DeviceKind",
    "DeviceSpec",
    "FleetStats",
    "Outgoing",
    "SimOptions",
    "Simulation",
    "Step",
    "load_devices",
    "load_devices_from_csv",
    "load_devices_from_json",
    "make_scenarios",
    "parse_mqtt_url",
    "run_fleet",
    "synthetic_fleet",
]
