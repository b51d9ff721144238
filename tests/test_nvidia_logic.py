"""The NVIDIA driver's pure logic: config, resource names and IDs, Allocate responses,
the Xid policy and fault book (preferred allocation is in test_nvidia_topology.py).
No NVML involved."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from nodedev import config
from nodedev.driver import AllocationError, ContainerEdits, Device, DeviceNode, Mount
from nodedev.drivers.nvidia.allocate import (
    CDI_KIND,
    AllocateSettings,
    cdi_name,
    cdi_spec,
    device_edits,
    request_edits,
    write_cdi_spec,
)
from nodedev.drivers.nvidia.discovery import GPU, MigDevice, mig_memory_gb, normalize_bus_id
from nodedev.drivers.nvidia.health import EventMonitor, HealthBook, XidPolicy
from nodedev.drivers.nvidia.options import HealthOptions, NvidiaOptions
from nodedev.drivers.nvidia.resources import ResourceError, Unit, build_units, declared_resources, physical_id

# ---------------------------------------------------------------- test data


def gpu(index: int, *, numa: int | None = 0, migs: tuple[MigDevice, ...] = (), mig_enabled: bool = False) -> GPU:
    return GPU(
        uuid=f"GPU-{index:08d}",
        index=index,
        minor=index,
        bus_id=f"0000:{index + 7:02x}:00.0",
        numa_node=numa,
        name="NVIDIA A100-SXM4-80GB",
        memory_mib=81920,
        mig_enabled=mig_enabled or bool(migs),
        migs=migs,
    )


def mig(parent: int, slot: int, gi: int, profile: str = "1g.10gb") -> MigDevice:
    return MigDevice(
        uuid=f"MIG-{parent}-{slot}",
        index=f"{parent}:{slot}",
        gpu_instance=gi,
        compute_instance=0,
        profile=profile,
        memory_mib=9856,
        cap_nodes=(f"nvidia-caps/nvidia-cap{100 + gi}", f"nvidia-caps/nvidia-cap{101 + gi}"),
    )


def options(**section: object) -> NvidiaOptions:
    return NvidiaOptions.model_validate({"enabled": True, **section})


def flags(**values: object) -> NvidiaOptions:
    plugin = values.pop("plugin", {})
    return options(flags={**values, "plugin": plugin})


def units_of(opts: NvidiaOptions, gpus: list[GPU]) -> dict[str, list[Unit]]:
    return build_units(gpus, opts)


def settings(**plugin: object) -> AllocateSettings:
    return AllocateSettings.from_options(flags(plugin=plugin))


# ---------------------------------------------------------------- config


def parse(section: dict[str, object]) -> config.Config:
    return config.parse(
        __import__("yaml").safe_dump({"drivers": {"nvidia": {"enabled": True, **section}}}), Path("/etc/nodedev.yaml")
    )


def test_defaults_match_nvidias_plugin() -> None:
    opts = options()
    assert opts.flags.mig_strategy == "none"
    assert opts.flags.fail_on_init_error is True
    assert opts.flags.plugin.device_list_strategies == ("envvar",)
    assert opts.flags.plugin.device_id_strategy == "uuid"
    assert opts.flags.plugin.pass_device_specs is False
    assert opts.flags.plugin.cdi_annotation_prefix == "cdi.k8s.io/"
    assert opts.health.ignored_xids == [13, 31, 43, 45, 68, 109]
    assert opts.cdi_root == "/var/run/cdi"


def test_a_pasted_nvidia_config_is_accepted_under_drivers_nvidia() -> None:
    cfg = parse(
        {
            "version": "v1",
            "flags": {
                "migStrategy": "mixed",
                "failOnInitError": False,
                "plugin": {
                    "passDeviceSpecs": True,
                    "deviceListStrategy": ["envvar", "cdi-cri"],
                    "deviceIDStrategy": "index",
                },
            },
            "sharing": {"timeSlicing": {"renameByDefault": True, "resources": [{"name": "nvidia.com/gpu", "replicas": 4}]}},
        }
    )
    (driver,) = cfg.drivers
    assert driver.name == "nvidia"
    assert driver.options.flags.plugin.device_id_strategy == "index"
    assert driver.options.flags.plugin.device_list_strategies == ("envvar", "cdi-cri")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"flags": {"plugin": {"deviceIdStrategy": "index"}}}, "drivers.nvidia.flags.plugin.deviceIdStrategy: unknown key"),
        ({"flags": {"migStrategy": "auto"}}, "drivers.nvidia.flags.migStrategy"),
        ({"flags": {"plugin": {"deviceListStrategy": "envvar,cdi"}}}, "unknown device list strategy 'cdi'"),
        ({"migStrategy": "mixed"}, "drivers.nvidia.migStrategy: unknown key"),
        ({"version": "v2"}, "drivers.nvidia.version"),
        (
            {"sharing": {"timeSlicing": {"resources": [{"name": "nvidia.com/gpu", "replicas": 1}]}}},
            "drivers.nvidia.sharing.timeSlicing.resources[0].replicas",
        ),
        ({"sharing": {"timeSlicing": {"resources": []}}}, "drivers.nvidia.sharing.timeSlicing.resources"),
        ({"sharing": {"mps": {"resources": []}}}, "drivers.nvidia.sharing.mps.resources"),
        (
            {"sharing": {"timeSlicing": {"resources": [{"name": "nvidia.com/mig-1g.10gb", "replicas": 2}]}}},
            "exists only with flags.migStrategy mixed",
        ),
        ({"health": {"ignoredXids": ["13"]}}, "drivers.nvidia.health.ignoredXids[0]"),
        ({"flags": {"plugin": {"cdiAnnotationPrefix": "cdi.k8s.io"}}}, "cdiAnnotationPrefix"),
    ],
)
def test_config_mistakes_name_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        parse(section)
    assert message in str(err.value)


SLICED = {"name": "nvidia.com/gpu", "replicas": 2}


@pytest.mark.parametrize(
    ("section", "where", "why"),
    [
        ({"sharing": {"mps": {"resources": [SLICED]}}}, "drivers.nvidia: ", "sharing.mps needs flags.mpsRoot"),
        ({"imex": {"channelIDs": [0]}}, "drivers.nvidia.imex.channelIDs", "IMEX channels are not supported"),
    ],
)
def test_nvidia_keys_nodedev_refuses_say_why(section: dict[str, object], where: str, why: str) -> None:
    """What nodedev cannot do fails the config, naming the key and the reason (the rest of
    NVIDIA's keys are accepted: test_nvidia_parity.py)."""
    with pytest.raises(config.ConfigError) as err:
        parse(section)
    assert where in str(err.value) and why in str(err.value)


def test_device_list_strategy_takes_nvidias_comma_form() -> None:
    opts = flags(plugin={"deviceListStrategy": "envvar, volume-mounts"})
    assert opts.flags.plugin.device_list_strategies == ("envvar", "volume-mounts")


def test_options_are_frozen() -> None:
    with pytest.raises(ValidationError):
        options().flags.mig_strategy = "mixed"  # type: ignore[misc]


# ---------------------------------------------------------------- resources and IDs


def test_declared_resources_come_from_the_config() -> None:
    assert declared_resources(options()) == ["nvidia.com/gpu"]
    shared = options(sharing={"timeSlicing": {"renameByDefault": True, "resources": [{"name": "nvidia.com/gpu", "replicas": 2}]}})
    assert declared_resources(shared) == ["nvidia.com/gpu.shared"]
    mixed = options(
        flags={"migStrategy": "mixed"},
        sharing={"timeSlicing": {"resources": [{"name": "nvidia.com/mig-1g.10gb", "replicas": 3}]}},
    )
    assert declared_resources(mixed) == ["nvidia.com/gpu", "nvidia.com/mig-1g.10gb"]


def test_strategy_none_offers_whole_gpus_even_with_mig_on() -> None:
    gpus = [gpu(0, migs=(mig(0, 0, 7),)), gpu(1)]
    result = units_of(flags(migStrategy="none"), gpus)
    assert {r: [u.id for u in us] for r, us in result.items()} == {"nvidia.com/gpu": ["GPU-00000000", "GPU-00000001"]}


def test_strategy_single_offers_mig_devices_as_nvidia_com_gpu() -> None:
    gpus = [gpu(0, migs=(mig(0, 0, 7), mig(0, 1, 8))), gpu(1, migs=(mig(1, 0, 7),))]
    result = units_of(flags(migStrategy="single"), gpus)
    assert [u.id for u in result["nvidia.com/gpu"]] == ["MIG-0-0", "MIG-0-1", "MIG-1-0"]


@pytest.mark.parametrize(
    ("gpus", "message"),
    [
        ([gpu(0, migs=(mig(0, 0, 7),)), gpu(1)], "same MIG mode on every GPU"),
        ([gpu(0, migs=(mig(0, 0, 7),)), gpu(1, migs=(mig(1, 0, 2, "3g.40gb"),))], "more than one MIG device type"),
        ([gpu(0, mig_enabled=True)], "MIG enabled but no MIG devices"),
    ],
)
def test_strategy_single_refuses_what_nvidia_refuses(gpus: list[GPU], message: str) -> None:
    with pytest.raises(ResourceError, match=message):
        units_of(flags(migStrategy="single"), gpus)


def test_strategy_mixed_names_resources_per_profile() -> None:
    gpus = [
        gpu(0, migs=(mig(0, 0, 7), mig(0, 1, 8, "1g.10gb+me"), mig(0, 2, 9, "1c.2g.20gb"))),
        gpu(1),
    ]
    warnings: list[str] = []
    result = build_units(gpus, flags(migStrategy="mixed"), warnings)
    assert {r: [u.id for u in us] for r, us in result.items()} == {
        "nvidia.com/gpu": ["GPU-00000001"],
        "nvidia.com/mig-1g.10gb": ["MIG-0-0"],
        "nvidia.com/mig-1g.10gb.me": ["MIG-0-1"],
    }
    assert any("1c.2g.20gb" in w for w in warnings)


def test_time_slicing_replicas_and_rename() -> None:
    opts = options(sharing={"timeSlicing": {"renameByDefault": True, "resources": [{"name": "nvidia.com/gpu", "replicas": 3}]}})
    result = units_of(opts, [gpu(0), gpu(1)])
    ids = [u.id for u in result["nvidia.com/gpu.shared"]]
    assert ids == [f"GPU-0000000{g}::{n}" for g in (0, 1) for n in range(3)]
    assert {physical_id(i) for i in ids} == {"GPU-00000000", "GPU-00000001"}
    assert "nvidia.com/gpu" not in result


def test_replicated_mig_resource_in_mixed() -> None:
    opts = options(
        flags={"migStrategy": "mixed"},
        sharing={"timeSlicing": {"resources": [{"name": "nvidia.com/mig-1g.10gb", "replicas": 2}]}},
    )
    result = units_of(opts, [gpu(0, migs=(mig(0, 0, 7),))])
    assert [u.id for u in result["nvidia.com/mig-1g.10gb"]] == ["MIG-0-0::0", "MIG-0-0::1"]


def test_numa_node_comes_with_every_id() -> None:
    result = units_of(options(), [gpu(0, numa=1), gpu(1, numa=None)])
    assert [u.numa_nodes for u in result["nvidia.com/gpu"]] == [(1,), ()]


def test_mig_memory_rounding_matches_nvidia_profile_names() -> None:
    total = 81920 << 20
    assert mig_memory_gb(total, 9856) == 10
    assert mig_memory_gb(total, 19968) == 20
    assert mig_memory_gb(total, 40192) == 40
    assert mig_memory_gb(40960 << 20, 4864) == 5


def test_bus_ids_compare_in_sysfs_form() -> None:
    assert normalize_bus_id("00000000:0F:00.0") == "0000:0f:00.0"
    assert normalize_bus_id(b"0000:87:00.0\x00") == "0000:87:00.0"


# ---------------------------------------------------------------- Allocate


GPUS = [gpu(0), gpu(1, numa=1, migs=(mig(1, 0, 7),))]


def unit(i: int, replica: int | None = None) -> Unit:
    g = GPUS[i]
    return Unit(id=g.uuid if replica is None else f"{g.uuid}::{replica}", gpu=g, replica=replica)


def mig_unit() -> Unit:
    return Unit(id="MIG-1-0", gpu=GPUS[1], mig=GPUS[1].migs[0])


def allocate(
    units: list[Unit], s: AllocateSettings, *, replicated: bool = False, control: tuple[str, ...] = ()
) -> ContainerEdits:
    """What the host does: each device's scan-time edits, joined, then the driver's request-wide part."""
    devices = [Device(id=u.id, edits=device_edits(u, s, Path("/dev"), control)) for u in units]
    names = {u.id: cdi_name(u, s) for u in units}
    return ContainerEdits.merge((d.edits for d in devices), request_edits(devices, replicated=replicated, settings=s, cdi_names=names))


def test_envvar_lists_each_gpu_once_replicas_collapsed() -> None:
    result = allocate([unit(0, 1), unit(0, 2), unit(1, 0)], settings(), replicated=True)
    assert result.envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-00000000,GPU-00000001"}
    assert result.devices == () and result.mounts == () and result.cdi_devices == ()


def test_index_strategy_uses_nvidia_smi_indices() -> None:
    result = allocate([unit(1), mig_unit()], settings(deviceIDStrategy="index"))
    assert result.envs["NVIDIA_VISIBLE_DEVICES"] == "1,1:0"


def test_volume_mounts_strategy() -> None:
    result = allocate([unit(0), unit(1)], settings(deviceListStrategy="volume-mounts"))
    assert result.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert result.mounts == (
        Mount("/dev/null", "/var/run/nvidia-container-devices/GPU-00000000"),
        Mount("/dev/null", "/var/run/nvidia-container-devices/GPU-00000001"),
    )


def test_cdi_annotations_and_cdi_cri_skip_env_when_only_cdi() -> None:
    result = allocate(
        [unit(0)], settings(deviceListStrategy=["cdi-annotations", "cdi-cri"], passDeviceSpecs=True), control=("nvidiactl",)
    )
    assert result.envs == {} and result.devices == () and result.mounts == ()
    assert result.cdi_devices == (f"{CDI_KIND}=GPU-00000000",)
    ((key, value),) = result.annotations.items()
    assert key.startswith("cdi.k8s.io/nodedev-nvidia_")
    assert value == f"{CDI_KIND}=GPU-00000000"


def test_cdi_annotation_prefix_is_configurable() -> None:
    result = allocate([unit(0)], settings(deviceListStrategy="cdi-annotations", cdiAnnotationPrefix="cdi.example.com/"))
    assert next(iter(result.annotations)).startswith("cdi.example.com/")


def test_pass_device_specs_adds_control_gpu_and_mig_capability_nodes() -> None:
    result = allocate([mig_unit(), unit(0)], settings(passDeviceSpecs=True), control=("nvidiactl", "nvidia-uvm"))
    assert [d.container_path for d in result.devices] == [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia1",
        "/dev/nvidia-caps/nvidia-cap107",
        "/dev/nvidia-caps/nvidia-cap108",
        "/dev/nvidia0",
    ]
    assert result.devices[2] == DeviceNode("/dev/nvidia1", "/dev/nvidia1", "rw")
    assert result.envs["NVIDIA_VISIBLE_DEVICES"] == "MIG-1-0,GPU-00000000"


def test_fail_requests_greater_than_one_refuses_two_shared_devices() -> None:
    opts = options(
        sharing={"timeSlicing": {"failRequestsGreaterThanOne": True, "resources": [{"name": "nvidia.com/gpu", "replicas": 2}]}}
    )
    s = AllocateSettings.from_options(opts)
    with pytest.raises(AllocationError, match="failRequestsGreaterThanOne"):
        allocate([unit(0, 0), unit(1, 0)], s, replicated=True)
    assert allocate([unit(0, 0)], s, replicated=True).envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-00000000"
    # Only shared resources are limited, as in NVIDIA's plugin.
    assert allocate([unit(0), unit(1)], s).envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-00000000,GPU-00000001"


@pytest.mark.parametrize(
    ("flag", "env"), [("gdrcopyEnabled", "NVIDIA_GDRCOPY"), ("gdsEnabled", "NVIDIA_GDS"), ("mofedEnabled", "NVIDIA_MOFED")]
)
def test_gdrcopy_gds_mofed_flags_each_add_their_env_and_only_theirs(flag: str, env: str) -> None:
    others = {"NVIDIA_GDRCOPY", "NVIDIA_GDS", "NVIDIA_MOFED"} - {env}
    on = allocate([unit(0), unit(1)], AllocateSettings.from_options(options(flags={flag: True}))).envs
    assert on == {env: "enabled", "NVIDIA_VISIBLE_DEVICES": "GPU-00000000,GPU-00000001"}
    assert not others & set(on)
    off = allocate([unit(0)], settings()).envs
    assert env not in off and off == {"NVIDIA_VISIBLE_DEVICES": "GPU-00000000"}


def test_request_edits_add_only_what_depends_on_the_request() -> None:
    """Everything a device needs is in its own edits; allocate() adds nothing for envvar."""
    s = settings(passDeviceSpecs=True, deviceListStrategy="envvar,cdi-cri")
    devices = [Device(id=u.id, edits=device_edits(u, s, Path("/dev"), ("nvidiactl",))) for u in (unit(0), mig_unit())]
    assert request_edits(devices, replicated=False, settings=s, cdi_names={}) == ContainerEdits()
    assert devices[1].edits.envs == {"NVIDIA_VISIBLE_DEVICES": "MIG-1-0"}
    assert devices[1].edits.cdi_devices == (f"{CDI_KIND}=MIG-1-0",)


def test_cdi_annotation_key_is_new_for_every_request() -> None:
    s = settings(deviceListStrategy="cdi-annotations")
    first, second = allocate([unit(0), unit(1)], s), allocate([unit(0), unit(1)], s)
    assert first.annotations.keys() != second.annotations.keys()
    assert list(first.annotations.values()) == [f"{CDI_KIND}=GPU-00000000,{CDI_KIND}=GPU-00000001"]


def test_cdi_spec_names_every_device_by_uuid_and_index(tmp_path: Path) -> None:
    spec = cdi_spec(GPUS, Path("/dev"), ("nvidiactl",))
    names = [d["name"] for d in spec["devices"]]
    assert names == ["GPU-00000000", "0", "GPU-00000001", "1", "MIG-1-0", "1:0"]
    assert spec["kind"] == CDI_KIND
    mig_nodes = [n["path"] for n in spec["devices"][4]["containerEdits"]["deviceNodes"]]
    assert mig_nodes == ["/dev/nvidia1", "/dev/nvidia-caps/nvidia-cap107", "/dev/nvidia-caps/nvidia-cap108"]
    path = write_cdi_spec(tmp_path / "cdi", spec)
    assert __import__("json").loads(path.read_text()) == spec
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


# ---------------------------------------------------------------- Xid policy and faults


def test_default_xid_policy_ignores_application_errors() -> None:
    policy = XidPolicy.from_options(HealthOptions())
    assert [x for x in (13, 31, 43, 45, 68, 109) if policy.is_critical(x)] == []
    assert all(policy.is_critical(x) for x in (48, 63, 64, 74, 79, 94, 95))


def test_critical_xids_win_over_ignored_and_off_means_off() -> None:
    policy = XidPolicy.from_options(HealthOptions(ignored_xids=[13, 94], critical_xids=[13]))
    assert policy.is_critical(13) and not policy.is_critical(94) and policy.is_critical(31)
    off = XidPolicy.from_options(HealthOptions(enabled=False))
    assert not off.is_critical(79)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fault_book_attributes_mig_faults_and_measures_quiet() -> None:
    clock = Clock()
    book = HealthBook(clock)
    assert book.record("GPU-A", "Xid 48 on GPU instance 7 compute instance 0", (7, 0))
    assert not book.record("GPU-A", "Xid 48 on GPU instance 7 compute instance 0", (7, 0))
    view = book.view()
    assert view.mig_problem("GPU-A", 7, 0) and view.mig_problem("GPU-A", 8, 0) is None
    assert view.gpu_problem("GPU-A")  # the whole GPU includes the faulted instance
    assert view.gpu_problem("GPU-B") is None
    clock.now += 5
    assert book.quiet_for("GPU-A") == 5
    book.record("GPU-A", "Xid 79")
    assert book.view().mig_problem("GPU-A", 8, 0) == "Xid 79"
    assert book.quiet_for("GPU-A") == 0
    assert book.clear("GPU-A") and book.view().gpu_problem("GPU-A") is None


class ProbedNVML(Exception):
    """NVMLError of a fake NVML whose GPUs all answer the probe."""


def monitor_on(book: HealthBook, clock: Clock, changes: list[str], **health: object) -> EventMonitor:
    """An event monitor on a fake NVML that answers every probe, for stepping by hand."""
    nvml = SimpleNamespace(NVMLError=ProbedNVML, nvmlDeviceGetMemoryInfo=lambda handle: None)
    return EventMonitor(
        nvml,
        {"GPU-X": object()},
        book,
        XidPolicy.from_options(HealthOptions()),
        HealthOptions.model_validate(health),
        on_change=lambda: changes.append("rescan"),
        log=logging.getLogger("test.nvidia"),
        clock=clock,
    )


def test_monitor_down_makes_every_gpu_unhealthy_until_quiet_after_up() -> None:
    clock, changes = Clock(), []
    book = HealthBook(clock)
    monitor = monitor_on(book, clock, changes, quietPeriodSeconds=300)
    book.mark_down("health monitoring failed: NVML event wait failed: Unknown Error")
    assert "event wait failed" in (book.view().gpu_problem("GPU-X") or "")
    book.mark_up(["GPU-X"], "health monitoring was interrupted")
    assert book.view().gpu_problem("GPU-X") == "health monitoring was interrupted"
    clock.now += 299
    monitor.probe()
    assert book.view().gpu_problem("GPU-X") == "health monitoring was interrupted" and changes == []
    clock.now += 1  # the quiet period is reached: the next probe clears it
    monitor.probe()
    assert book.view().gpu_problem("GPU-X") is None and changes == ["rescan"]


def test_a_new_fault_restarts_the_quiet_period() -> None:
    clock, changes = Clock(), []
    book = HealthBook(clock)
    monitor = monitor_on(book, clock, changes, quietPeriodSeconds=60)
    book.record("GPU-X", "Xid 48")
    clock.now += 50
    book.record("GPU-X", "Xid 79")
    clock.now += 50  # 100 s after the first fault, 50 s after the last
    monitor.probe()
    assert book.view().gpu_problem("GPU-X") == "Xid 79"
    clock.now += 10
    monitor.probe()
    assert book.view().gpu_problem("GPU-X") is None


def test_quiet_period_null_never_clears_however_long_it_is_quiet() -> None:
    clock, changes = Clock(), []
    book = HealthBook(clock)
    monitor = monitor_on(book, clock, changes, quietPeriodSeconds=None)
    book.record("GPU-X", "Xid 48")
    for _ in range(3):
        clock.now += 10**9
        monitor.probe()
    assert book.view().gpu_problem("GPU-X") == "Xid 48" and changes == []


def test_mig_profile_falls_back_to_slice_counts_when_the_name_has_none() -> None:
    from types import SimpleNamespace

    from nodedev.drivers.nvidia.discovery import _mig_profile

    class NVMLError(Exception):
        pass

    def attributes(g: int, c: int, mib: int) -> SimpleNamespace:
        return SimpleNamespace(gpuInstanceSliceCount=g, computeInstanceSliceCount=c, memorySizeMB=mib)

    def nvml_for(attrs: SimpleNamespace, name: str = "NVIDIA A100-SXM4-80GB") -> SimpleNamespace:
        def no_memory(_handle: object) -> None:
            raise NVMLError("not supported")

        return SimpleNamespace(
            NVMLError=NVMLError,
            nvmlDeviceGetMemoryInfo=no_memory,
            nvmlDeviceGetName=lambda _h: name,
            nvmlDeviceGetAttributes=lambda _h: attrs,
        )

    total = 81920 << 20
    assert _mig_profile(nvml_for(attributes(1, 1, 9856)), object(), total) == ("1g.10gb", 9856)
    assert _mig_profile(nvml_for(attributes(2, 1, 19968)), object(), total) == ("1c.2g.20gb", 19968)
    named = nvml_for(attributes(1, 1, 9856), "NVIDIA A100-SXM4-80GB MIG 1g.10gb+me")
    assert _mig_profile(named, object(), total)[0] == "1g.10gb+me"
