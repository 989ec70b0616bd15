"""The hardware catalog: memory tiers, links, GPUs and the profiles that combine them, every number cited.

Each component carries ``sources``, mapping every numeric field to its citation, tagged as in
``docs/reference/hardware.md``: [P] the seed paper's artifact (Kyung, Yun, Ahn, IEEE CAL 2025,
github.com/scale-snu/SSD-offloading, patch/ssd_offloading.patch), [D] a vendor datasheet or spec,
[S] a secondary source citing a primary, [DER] arithmetic from the others or a stated assumption.
Construction fails when a numeric field has no citation, so a profile can always be audited.

Components are built with :func:`_cited`, which takes each number together with its citation, and
changed with :func:`_revised`, which demands a new citation for every number it changes.

Units: bytes, seconds, watts, FLOP/s, picojoules per bit. Decimal GB/TB unless a name says GiB.
Link bandwidths are per direction.
"""

from __future__ import annotations

from typing import Any

import attrs
from attrs import validators as v

from tierflow.catalog.lookup import lookup

KiB, MiB, GiB = 2**10, 2**20, 2**30
GB, TB = 1e9, 1e12
US, NS = 1e-6, 1e-9

_P = "[P] scale-snu/SSD-offloading patch/ssd_offloading.patch"
_HW_MD = "docs/reference/hardware.md"
_PAPER_LINK_ENERGY = f"{_P}: link energy is not modelled in the paper"
_PAPER_NO_LATENCY = f"{_P}: an offload copy is timed as bytes / offload_bandwidth, with no latency term"

_positive = v.gt(0)
_non_negative = v.ge(0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sources(instance: Any) -> None:
    """Every numeric field needs a non-empty citation, and every citation a field."""
    field_names = {field.name for field in attrs.fields(type(instance))}
    numeric = [name for name in field_names if _is_number(getattr(instance, name))]
    missing = sorted(name for name in numeric if not instance.sources.get(name, "").strip())
    unknown = sorted(set(instance.sources) - field_names)
    label = f"{type(instance).__name__} {instance.name!r}"
    if missing:
        raise ValueError(f"{label}: no source for {', '.join(missing)}")
    if unknown:
        raise ValueError(f"{label}: sources name unknown fields {', '.join(unknown)}")


@attrs.frozen(kw_only=True)
class MemoryTier:
    """One level of the memory hierarchy: GPU HBM, host DDR (one GPU's share), or an NVMe SSD.

    The SSD-only fields (``read_iops`` and after) are None for DRAM tiers.
    """

    name: str
    capacity_bytes: float = attrs.field(validator=_positive)
    read_bandwidth_bytes_per_s: float = attrs.field(validator=_positive)
    write_bandwidth_bytes_per_s: float = attrs.field(validator=_positive)
    read_latency_s: float = attrs.field(validator=_non_negative)
    read_pj_per_bit: float = attrs.field(validator=_non_negative)
    write_pj_per_bit: float = attrs.field(validator=_non_negative)
    static_power_w: float = attrs.field(validator=_non_negative)
    read_iops: float | None = attrs.field(default=None, validator=v.optional(_positive))  # 4 KiB random reads/s
    queue_depth: int | None = attrs.field(default=None, validator=v.optional(_positive))  # requests the host keeps in flight
    internal_parallelism: int | None = attrs.field(default=None, validator=v.optional(_positive))  # requests served at once
    request_bytes: int | None = attrs.field(default=None, validator=v.optional(_positive))  # size an expert read is split into
    sources: dict[str, str] = attrs.field(hash=False)

    def __attrs_post_init__(self) -> None:
        _check_sources(self)


@attrs.frozen(kw_only=True)
class Link:
    """A data path between two tiers; bandwidths per direction, ``bandwidth`` the usable (measured) one."""

    name: str
    bandwidth_bytes_per_s: float = attrs.field(validator=_positive)
    theoretical_bandwidth_bytes_per_s: float = attrs.field(validator=_positive)
    latency_s: float = attrs.field(validator=_non_negative)  # fixed cost per transfer
    pj_per_bit: float = attrs.field(validator=_non_negative)
    sources: dict[str, str] = attrs.field(hash=False)

    def __attrs_post_init__(self) -> None:
        _check_sources(self)
        if self.bandwidth_bytes_per_s > self.theoretical_bandwidth_bytes_per_s:
            raise ValueError(f"Link {self.name!r}: usable bandwidth exceeds the theoretical one")


@attrs.frozen(kw_only=True)
class Gpu:
    """An accelerator: dense BF16 peak (FLOP/s), the dense FP8 peak where its tensor cores have one, energy per
    FLOP, background power and its HBM."""

    name: str
    peak_flops: float = attrs.field(validator=_positive)  # dense BF16 FLOP/s
    pj_per_flop: float = attrs.field(validator=_non_negative)
    static_power_w: float = attrs.field(validator=_non_negative)  # background power of the board
    hbm: MemoryTier
    l1_pj_per_bit: float | None = attrs.field(default=None, validator=v.optional(_non_negative))
    l2_pj_per_bit: float | None = attrs.field(default=None, validator=v.optional(_non_negative))
    # Dense FP8 FLOP/s: GEMMs over FP8 weights run at it; None: at the BF16 peak.
    peak_flops_fp8: float | None = attrs.field(default=None, validator=v.optional(_positive))
    sources: dict[str, str] = attrs.field(hash=False)

    def __attrs_post_init__(self) -> None:
        _check_sources(self)


@attrs.frozen(kw_only=True)
class HardwareProfile:
    """One GPU's view of a machine: its HBM, its share of host DDR, an SSD, and the links between them.

    ``host_link`` carries DDR <-> GPU traffic; ``ssd_link`` is the SSD's own link (to the host, or to the
    GPU with GPUDirect Storage). ``nvlink`` is GPU <-> GPU, None on a single consumer GPU.
    """

    name: str
    description: str
    gpu: Gpu
    ddr: MemoryTier
    ssd: MemoryTier
    host_link: Link
    ssd_link: Link
    gpudirect_storage: bool  # SSD -> HBM by DMA without a DDR bounce buffer
    nvlink: Link | None
    sources: dict[str, str] = attrs.field(hash=False)  # the profile's own choices
    # Multi-node deployments: GPUs per node share NVLink; traffic between nodes takes the per-GPU network link.
    # None: every GPU of a deployment sits on one NVLink domain.
    gpus_per_node: int | None = attrs.field(default=None, validator=v.optional(_positive))
    internode: Link | None = None

    def __attrs_post_init__(self) -> None:
        _check_sources(self)

    @property
    def ddr_static_power_w_per_gpu(self) -> float:
        """Background power of the host DDR serving this GPU (the DDR tier is that share), in W."""
        return self.ddr.static_power_w

    @property
    def static_power_w(self) -> float:
        """Background power of everything in the profile, in W."""
        return self.gpu.static_power_w + self.gpu.hbm.static_power_w + self.ddr.static_power_w + self.ssd.static_power_w

    def components(self) -> dict[str, MemoryTier | Link | Gpu]:
        """Every cited component by its role, for audits and reports."""
        parts = {"gpu": self.gpu, "hbm": self.gpu.hbm, "ddr": self.ddr, "ssd": self.ssd,
                 "host_link": self.host_link, "ssd_link": self.ssd_link}
        if self.nvlink is not None:
            parts["nvlink"] = self.nvlink
        if self.internode is not None:
            parts["internode"] = self.internode
        return parts


def _cited(cls, **fields):
    """Build ``cls`` from fields given as ``(value, citation)`` pairs (plain values for non-numbers)."""
    values, sources = {}, {}
    for name, field_value in fields.items():
        if isinstance(field_value, tuple):
            values[name], sources[name] = field_value
        else:
            values[name] = field_value
    return cls(**values, sources=sources)


def _revised(component, **changes):
    """``component`` with ``changes``; a changed number must come as ``(value, citation)``."""
    values, sources = {}, dict(component.sources)
    for name, change in changes.items():
        if isinstance(change, tuple):
            values[name], sources[name] = change
        elif _is_number(change):
            raise ValueError(f"{name}: a changed number needs a citation, as (value, citation)")
        else:
            values[name] = change
    return attrs.evolve(component, **values, sources=sources)


# --- Memory tiers ------------------------------------------------------------------------------------

H100_SXM_HBM3 = _cited(
    MemoryTier, name="H100 SXM HBM3",
    capacity_bytes=(80 * GiB, f"{_P}: memory_capacity = 80.0 * 1024^3 (NVIDIA: 80 GB)"),
    read_bandwidth_bytes_per_s=(3.352e12, f"{_P}: base_memory_bandwidth 3.352 TB/s (NVIDIA: 3.35 TB/s [S])"),
    write_bandwidth_bytes_per_s=(3.352e12, "[DER] HBM bandwidth is shared by reads and writes; same figure"),
    read_latency_s=(0.5 * US, ("[DER] assumption: ~600 core cycles at the SXM's 1.98 GHz boost ~ 0.30 us in public "
                               "hierarchy tables [S], rounded up; under 4% of moving one 44 MB expert at 3.35 TB/s")),
    read_pj_per_bit=(4.2, f"{_P}: HBM_READ_ENERGY 4.2 pJ/bit (HBM3)"),
    write_pj_per_bit=(4.2, f"{_P}: the artifact charges HBM_READ_ENERGY for the write into HBM"),
    static_power_w=(0.0, f"{_P}: included in the GPU's 70 W background power"),
)

H200_HBM3E = _cited(
    MemoryTier, name="H200 HBM3E",
    capacity_bytes=(141 * GiB, (f"[S] {_HW_MD}: H200 HBM3E 141 GB (NVIDIA), nominal and binary like the H100's 80 GB "
                                "(80 GiB above, as the artifact): nvidia-smi shows 143,771 MiB = 140.4 GiB usable on "
                                "an H200 (0.4% less), 81,559 MiB on an H100")),
    read_bandwidth_bytes_per_s=(4.8e12, f"[S] {_HW_MD}: 4.8 TB/s (NVIDIA)"),
    write_bandwidth_bytes_per_s=(4.8e12, "[DER] shared by reads and writes; same figure"),
    read_latency_s=(0.5 * US, "[DER] assumption: as H100 HBM3 (same GH100 memory system)"),
    read_pj_per_bit=(3.44, f"[S] {_HW_MD}: HBM3E ~3.44 pJ/bit (SK hynix, IEDM 2023)"),
    write_pj_per_bit=(3.44, "[DER] assumption: write taken equal to read, as the seed paper does for HBM3"),
    static_power_w=(0.0, "[DER] included in the GPU's background power, as the paper does for H100"),
)

RTX_5070_TI_GDDR7 = _cited(
    MemoryTier, name="RTX 5070 Ti GDDR7",
    capacity_bytes=(16 * GiB, "[S] NVIDIA RTX 5070 Ti spec table: 16 GB GDDR7, 256-bit (8 x 16 Gbit devices = 16 GiB)"),
    read_bandwidth_bytes_per_s=(896 * GB, "[S] NVIDIA RTX 5070 Ti spec table: 896 GB/s"),
    write_bandwidth_bytes_per_s=(896 * GB, "[DER] shared by reads and writes; same figure"),
    read_latency_s=(0.5 * US, "[DER] assumption: GPU DRAM latency of the same order as HBM's"),
    read_pj_per_bit=(7.5, ("[DER] assumption: no published GDDR7 pJ/bit found; GDDR6-class ~7.5 pJ/bit, "
                           "about 2x HBM3's 4.2 because GDDR drives off-package board traces")),
    write_pj_per_bit=(7.5, "[DER] assumption: write taken equal to read"),
    static_power_w=(0.0, "[DER] included in the GPU's background power"),
)

DDR5_HOST = _cited(
    MemoryTier, name="DDR5 host memory (one GPU's share)",
    capacity_bytes=(256 * GiB, f"{_P}: '256GB of CPU memory (DDR5-7200 x8) per GPU' (figure_4_and_5.py)"),
    read_bandwidth_bytes_per_s=(460.8 * GB, (f"[DER] {_P}'s per-GPU 'DDR5-7200 x8' (figure_4_and_5.py): "
                                             "8 channels x 7200 MT/s x 8 B = 460.8 GB/s for each GPU's share; "
                                             "never the bound here (the host link is slower)")),
    write_bandwidth_bytes_per_s=(460.8 * GB, "[DER] same channels; same figure"),
    read_latency_s=(100 * NS, "[DER] assumption: ~100 ns loaded DRAM latency; the host link's latency dominates"),
    read_pj_per_bit=(9.2, f"{_P}: DDR5 read 9.2 pJ/bit"),
    write_pj_per_bit=(9.2, "[DER] assumption: the paper gives only a read figure; writes taken equal"),
    static_power_w=(57.0, f"{_P}: 57 W background for 256 GB DDR5-7200 x8 per GPU"),
)

DESKTOP_DDR5 = _cited(
    MemoryTier, name="Desktop DDR5 (free share, FlashMoE)",
    capacity_bytes=(1 * GB, "[S] FlashMoE (arXiv 2601.17063): about 1 GB of free DRAM"),
    read_bandwidth_bytes_per_s=(89.6 * GB, "[DER] assumption: dual-channel DDR5-5600 = 2 x 5600 MT/s x 8 B"),
    write_bandwidth_bytes_per_s=(89.6 * GB, "[DER] same channels; same figure"),
    read_latency_s=(100 * NS, "[DER] assumption: ~100 ns DRAM latency"),
    read_pj_per_bit=(9.2, f"[DER] the paper's DDR5 read figure reused ({_P})"),
    write_pj_per_bit=(9.2, "[DER] assumption: writes taken equal to reads"),
    static_power_w=(7.125, "[DER] the paper's 57 W per 256 GB scaled to an assumed 32 GB desktop: 57 x 32/256"),
)

_LITTLE = "[DER] Little's law: read_iops x read_latency_s = requests in flight needed to reach the rated IOPS"
_QUEUE = ("[DER] assumption: 256 host-side requests in flight, above every drive's Little's-law concurrency "
          "so the host queue never caps the drive")
_REQUEST = ("[DER] assumption: 128 KiB requests, the common Linux max_sectors_kb split of a large read")
_SSD_IDLE = f"{_P}: SSD background power ignored as negligible (cites the Samsung 9100 PRO page)"

SAMSUNG_990_PRO = _cited(
    MemoryTier, name="Samsung 990 PRO 2 TB (PCIe Gen4 NVMe)",
    capacity_bytes=(2 * TB, "[D] Samsung 990 PRO 2 TB"),
    read_bandwidth_bytes_per_s=(7.45 * GB, f"[D] {_HW_MD}: 7.45 GB/s sequential read"),
    write_bandwidth_bytes_per_s=(6.9 * GB, f"[D] {_HW_MD}: 6.9 GB/s sequential write"),
    read_latency_s=(50 * US, f"[DER] assumption: inside the ~27-70 us 4K random-read range of {_HW_MD} [S]"),
    read_pj_per_bit=(90.6, f"[D]/[DER] {_HW_MD}: 5.4 W average / 7.45 GB/s = 90.6 pJ/bit"),
    write_pj_per_bit=(97.8, "[DER] 5.4 W average / 6.9 GB/s = 97.8 pJ/bit, assuming the same average power"),
    static_power_w=(0.0, _SSD_IDLE),
    read_iops=(1.4e6, f"[D] {_HW_MD}: 1.4M 4K random read IOPS"),
    queue_depth=(256, _QUEUE),
    internal_parallelism=(70, f"{_LITTLE}: 1.4M x 50 us = 70"),
    request_bytes=(128 * KiB, _REQUEST),
)

SAMSUNG_PM1743 = _cited(
    MemoryTier, name="Samsung PM1743 7.68 TB (PCIe Gen5 NVMe)",
    capacity_bytes=(7.68 * TB, "[D] Samsung PM1743 7.68 TB capacity point"),
    read_bandwidth_bytes_per_s=(13.0 * GB, f"[D]/[S] {_HW_MD}: 13.0 GB/s sequential read"),
    write_bandwidth_bytes_per_s=(6.6 * GB, f"[D]/[S] {_HW_MD}: 6.6 GB/s sequential write"),
    read_latency_s=(70 * US, f"[S] {_HW_MD}: Gen5 enterprise 4K random read ~27-70 us; upper end, conservative"),
    read_pj_per_bit=(206.0, f"[S]/[DER] {_HW_MD}: 608 MB/s per W = 206 pJ/bit"),
    write_pj_per_bit=(473.0, f"[DER] up to 25 W ({_HW_MD} [D]/[S]) / 6.6 GB/s = 473 pJ/bit, an upper bound"),
    static_power_w=(0.0, _SSD_IDLE),
    read_iops=(2.5e6, f"[D]/[S] {_HW_MD}: 2.5M 4K random read IOPS"),
    queue_depth=(256, _QUEUE),
    internal_parallelism=(175, f"{_LITTLE}: 2.5M x 70 us = 175"),
    request_bytes=(128 * KiB, _REQUEST),
)

FLASHMOE_NVME = _revised(
    SAMSUNG_990_PRO, name="FlashMoE desktop NVMe (Gen4-class, 7.4 GB/s)",
    read_bandwidth_bytes_per_s=(7.4 * GB, ("[S] FlashMoE (arXiv 2601.17063): 7.4 GB/s NVMe; other fields "
                                           "assume a 990 PRO-class Gen4 drive [DER]")),
)

# --- Links ---------------------------------------------------------------------------------------------

_PCIE_PHY_GEN5 = f"[S] {_HW_MD}: PCIe Gen5 PHY 11.4 pJ/bit per direction (CICC 2020)"
# An SSD's read pJ/bit is its whole power over its bandwidth, so it includes the drive's own PHY: charging the
# link's full figure on SSD reads counts the drive end of that link twice (an upper bound of a few percent).
_PCIE_PHY_GEN4 = "[DER] assumption: no Gen4 figure found; the Gen5 PHY's 11.4 pJ/bit reused"
_PCIE_SETUP = ("[DER] assumption: ~5 us per transfer for copy-engine launch and DMA setup; negligible "
               "beside multi-MB expert copies")
_IN_SSD_LATENCY = "[DER] 0: an SSD's quoted read latency is measured at the host and already includes its link"

PCIE_GEN4_X16 = _cited(
    Link, name="PCIe Gen4 x16",
    bandwidth_bytes_per_s=(25 * GB, f"[S] {_HW_MD}: ~25 GB/s host-to-device measured (bam#54, nvbandwidth#15)"),
    theoretical_bandwidth_bytes_per_s=(31.5 * GB, "[DER] 16 GT/s x 16 lanes x 128/130 / 8 = 31.5 GB/s"),
    latency_s=(5 * US, _PCIE_SETUP),
    pj_per_bit=(11.4, _PCIE_PHY_GEN4),
)

PCIE_GEN5_X16 = _cited(
    Link, name="PCIe Gen5 x16",
    bandwidth_bytes_per_s=(35.2 * GB, (f"[S] {_HW_MD}: 35.2 GB/s host-to-device measured on H100 (nvbandwidth#24); "
                                       "an SM-copy figure, where the same run measured 52.8 GB/s device-to-host, so "
                                       "a copy-engine (DMA) read may run faster: a conservative rate")),
    theoretical_bandwidth_bytes_per_s=(63.0 * GB, "[DER] 32 GT/s x 16 lanes x 128/130 / 8 = 63.0 GB/s"),
    latency_s=(5 * US, _PCIE_SETUP),
    pj_per_bit=(11.4, _PCIE_PHY_GEN5),
)

PCIE_GEN4_X4 = _cited(
    Link, name="PCIe Gen4 x4 (SSD)",
    bandwidth_bytes_per_s=(7.88 * GB, ("[DER] no measurement; the theoretical figure, which a 7.45 GB/s drive shows "
                                       "is nearly usable")),
    theoretical_bandwidth_bytes_per_s=(7.88 * GB, "[DER] 16 GT/s x 4 lanes x 128/130 / 8 = 7.88 GB/s"),
    latency_s=(0.0, _IN_SSD_LATENCY),
    pj_per_bit=(11.4, _PCIE_PHY_GEN4),
)

PCIE_GEN5_X4 = _cited(
    Link, name="PCIe Gen5 x4 (SSD)",
    bandwidth_bytes_per_s=(15.75 * GB, ("[DER] no measurement; the theoretical figure (drives here reach 13-14.7 GB/s "
                                        "through it)")),
    theoretical_bandwidth_bytes_per_s=(15.75 * GB, "[DER] 32 GT/s x 4 lanes x 128/130 / 8 = 15.75 GB/s"),
    latency_s=(0.0, _IN_SSD_LATENCY),
    pj_per_bit=(11.4, _PCIE_PHY_GEN5),
)

NVLINK_C2C = _cited(
    Link, name="NVLink-C2C (GH200, per direction)",
    bandwidth_bytes_per_s=(450 * GB, "[DER] no measurement found; the theoretical per-direction figure"),
    theoretical_bandwidth_bytes_per_s=(450 * GB, ("[D] NVIDIA: 900 GB/s total bidirectional (7x PCIe Gen5 x16's "
                                                  "128 GB/s) = 450 GB/s each way")),
    latency_s=(0.8 * US, f"[DER] assumption: the artifact's NVLink device latency ({_P}: 0.8 us)"),
    pj_per_bit=(1.3, ("[S] NVIDIA's NVLink-C2C presentation: 1.3 pJ/bit, against 5.5 pJ/bit for a 112G PAM4 "
                      "SerDes link (summarised at besthub.dev, 'Why Nvidia's NVLink C2C Is Redefining GPU-CPU "
                      "Interconnects')")),
)

NVLINK4 = _cited(
    Link, name="NVLink4 (H100, per direction)",
    bandwidth_bytes_per_s=(380 * GB, f"[S] {_HW_MD}: 380 of 450 GB/s one direction measured (nccl#1264)"),
    theoretical_bandwidth_bytes_per_s=(450 * GB, f"[D] 900 GB/s bidirectional per H100; {_P}: 450 GB/s"),
    latency_s=(0.8 * US, f"{_P}: device_ict_latency = 0.8 us for H100 NVLink4"),
    pj_per_bit=(5.5, ("[DER] assumption: no published NVLink4 figure found (NVIDIA's 1.3 pJ/bit is NVLink-C2C's, "
                      "an on-package link); NVLink4 runs off-package SerDes lanes through NVSwitch, so the 5.5 "
                      "pJ/bit SerDes figure NVIDIA compares C2C with (see NVLink-C2C)")),
)

# --- GPUs ---------------------------------------------------------------------------------------------

H100_SXM = _cited(
    Gpu, name="H100 SXM",
    peak_flops=(989.4e12, f"{_P}: compute_peak_flops 989.4 TFLOPS (dense FP16/BF16)"),
    peak_flops_fp8=(1978.8e12, (f"[D] NVIDIA H100 SXM datasheet: FP8 tensor core 3,958 TFLOPS with sparsity = 1,979 "
                                f"dense, twice BF16's; {_P} (eval/test.cpp) doubles compute_peak_flops for 1-byte "
                                "weights likewise")),
    pj_per_flop=(0.16, f"{_P}: 0.32 pJ per BF16 MAC = 0.16 pJ/FLOP (cites TPUv4i, ISCA'21)"),
    static_power_w=(70.0, f"{_P}: 70 W background per H100 SXM 80GB, HBM included"),
    hbm=H100_SXM_HBM3,
    l1_pj_per_bit=(0.16, f"{_P}: L1_ENERGY 0.16 pJ/bit"),
    l2_pj_per_bit=(0.3, f"{_P}: L2_ENERGY 0.3 pJ/bit"),
)

_SAME_DIE = "[DER] same GH100 die as H100 SXM; the seed paper's figure reused"
H200 = _cited(
    Gpu, name="H200 SXM",
    peak_flops=(989.4e12, "[DER] NVIDIA lists 1,979 TFLOPS sparse BF16 for H200 SXM, as for H100 SXM; dense = half"),
    peak_flops_fp8=(1978.8e12, ("[DER] NVIDIA lists 3,958 TFLOPS sparse FP8 for H200 SXM, as for H100 SXM; "
                                "dense = half")),
    pj_per_flop=(0.16, _SAME_DIE),
    static_power_w=(70.0, f"{_SAME_DIE} (same 700 W board class)"),
    hbm=H200_HBM3E,
    l1_pj_per_bit=(0.16, _SAME_DIE),
    l2_pj_per_bit=(0.3, _SAME_DIE),
)

RTX_5070_TI = _cited(
    Gpu, name="GeForce RTX 5070 Ti",
    peak_flops=(87.9e12, ("[DER] NVIDIA spec 1406 AI TOPS (FP4, sparse) / 16 = 87.9 TFLOPS dense BF16 with FP32 "
                          "accumulate (sparse->dense /2, FP4->FP8->FP16 /4, FP32 accumulate at half rate on GeForce, "
                          "a ratio measured on an RTX 5060 Ti by QuantumDrizzy/BLACKWALL [S]); a public GPU table "
                          "lists 88 [S]")),
    peak_flops_fp8=(175.8e12, ("[DER] the same derivation one precision step down: 1406 / 2 (sparse) / 2 (FP4->FP8) "
                               "/ 2 (FP32 accumulate) = 175.8 TFLOPS, twice the BF16 figure")),
    pj_per_flop=(0.16, "[DER] assumption: the seed paper's per-MAC energy reused for a 4/5 nm-class tensor core"),
    static_power_w=(30.0, ("[DER] assumption: 10% of its 300 W total graphics power [S], the paper's 70 W / 700 W "
                           "ratio for H100 SXM")),
    hbm=RTX_5070_TI_GDDR7,
)

# --- The seed paper's exact setting -----------------------------------------------------------------

KYUNG_H100 = _revised(
    H100_SXM, name="H100 SXM (Kyung et al. 2025)",
    hbm=_revised(H100_SXM_HBM3, name="H100 SXM HBM3 (Kyung et al. 2025)",
                 read_latency_s=(0.0, f"{_P}: memory time is bytes / bandwidth (roofline), no latency term")),
)


def _kyung_c2c(bandwidth_bytes_per_s: float) -> Link:
    nvlink_gen = {450 * GB: 4, 900 * GB: 5}[bandwidth_bytes_per_s]
    rate = (f"{_P}: offload_bandwidth {bandwidth_bytes_per_s / GB:.0f} GB/s "
            f"(config offload_bandwidth: {nvlink_gen}; the paper calls it NVLink-C2C)")
    return _cited(
        Link, name=f"NVLink-C2C {bandwidth_bytes_per_s / GB:.0f} GB/s (Kyung et al. 2025)",
        bandwidth_bytes_per_s=(bandwidth_bytes_per_s, rate),
        theoretical_bandwidth_bytes_per_s=(bandwidth_bytes_per_s, rate),
        latency_s=(0.0, _PAPER_NO_LATENCY),
        pj_per_bit=(0.0, _PAPER_LINK_ENERGY),
    )


def _kyung_ddr(link_bytes_per_s: float) -> MemoryTier:
    return _revised(
        DDR5_HOST, name="DDR5 host memory (Kyung et al. 2025)",
        read_bandwidth_bytes_per_s=(link_bytes_per_s, (f"{_P}: DDR bandwidth is not modelled; a DDR offload copy runs "
                                                       "at the link rate, so the tier is set to it")),
        write_bandwidth_bytes_per_s=(link_bytes_per_s, "[DER] as the read bandwidth; the paper never writes to DDR"),
        read_latency_s=(0.0, _PAPER_NO_LATENCY),
        # The paper's runs never write to DDR; runs beyond it that stage SSD reads there or keep a DDR expert cache do.
        write_pj_per_bit=(9.2, "[DER] assumption: taken equal to the read energy, as for DDR5_HOST (the paper "
                               "never writes to DDR)"),
    )


def _kyung_ssd(link_bytes_per_s: float) -> MemoryTier:
    keeps_up = (f"{_P}: an SSD offload copy runs at the link rate (the paper assumes the SSD keeps up with the "
                "link), so the SSD is set to it")
    request_bytes = 1 * MiB
    return _cited(
        MemoryTier, name="NVMe SSD (Kyung et al. 2025)",
        capacity_bytes=(8 * TB, f"[DER] not modelled; the largest Samsung 9100 PRO [D], the drive {_P} cites"),
        read_bandwidth_bytes_per_s=(link_bytes_per_s, keeps_up),
        write_bandwidth_bytes_per_s=(link_bytes_per_s, "[DER] as the read bandwidth; the paper never writes to SSD"),
        read_latency_s=(0.0, _PAPER_NO_LATENCY),
        read_pj_per_bit=(102.4, f"{_P}: OFFLOAD_READ_ENERGY 102.4 pJ/bit (M.2 NVMe SSD read; ssd_energy_scale 1.0)"),
        write_pj_per_bit=(0.0, f"{_P}: not modelled; the paper never writes to the SSD"),
        static_power_w=(0.0, _SSD_IDLE),
        read_iops=(link_bytes_per_s / request_bytes, ("[DER] link rate / request_bytes, so IOPS never bind before "
                                                      "bandwidth, as in the paper")),
        queue_depth=(1, "[DER] not modelled; with zero latency one request in flight reaches full bandwidth"),
        internal_parallelism=(1, "[DER] not modelled; see queue_depth"),
        request_bytes=(request_bytes, "[DER] not modelled; 1 MiB"),
    )


KYUNG_NVLINK4 = _cited(
    Link, name="NVLink4 (Kyung et al. 2025)",
    bandwidth_bytes_per_s=(450 * GB, f"{_P}: device_ict_bandwidth 450 GB/s (NVLink 4th gen, DGX H100)"),
    theoretical_bandwidth_bytes_per_s=(450 * GB, f"{_P}: device_ict_bandwidth 450 GB/s"),
    latency_s=(0.8 * US, f"{_P}: device_ict_latency 0.8 us"),
    pj_per_bit=(0.0, _PAPER_LINK_ENERGY),
)

# A real drive's bandwidth, IOPS, queue and latency with the paper's read energy and no idle power, on its
# Gen5 x4 link with the paper's zero link energy, so that only the timing assumption changes.
KYUNG_REAL_SSD_LINK = _revised(PCIE_GEN5_X4, name="PCIe Gen5 x4 (SSD; Kyung et al. 2025 energy)",
                               pj_per_bit=(0.0, _PAPER_LINK_ENERGY))

KYUNG_REAL_SSD = _revised(
    SAMSUNG_PM1743, name="Samsung PM1743 timing, paper energy (Kyung et al. 2025)",
    read_pj_per_bit=(102.4, f"{_P}: OFFLOAD_READ_ENERGY 102.4 pJ/bit (M.2 NVMe SSD read)"),
    static_power_w=(0.0, _SSD_IDLE),
)

KYUNG_INFINIBAND = _cited(
    Link, name="InfiniBand between nodes (Kyung et al. 2025)",
    bandwidth_bytes_per_s=(50 * GB, f"{_P}: eval/test.cpp sets 50 GB/s InfiniBand for decode across nodes"),
    theoretical_bandwidth_bytes_per_s=(50 * GB, f"{_P}: 50 GB/s (400 Gb/s NDR per GPU)"),
    latency_s=(0.13 * US, f"{_P}: eval/test.cpp sets 0.13 us"),
    pj_per_bit=(0.0, _PAPER_LINK_ENERGY),
)

# --- Profiles ------------------------------------------------------------------------------------------

_GDS_ON = "[D] NVIDIA GDS design guide: H100-class GPUs support direct SSD-to-GPU DMA"


def _kyung_profile(name: str, link_bytes_per_s: float, link: Link | None = None, ssd: MemoryTier | None = None,
                   ssd_link: Link | None = None, description: str | None = None) -> HardwareProfile:
    """The paper's setting; the beyond-the-paper variants swap in a real link or a real SSD, one at a time."""
    link = link or _kyung_c2c(link_bytes_per_s)
    return HardwareProfile(
        name=name,
        description=description or (
            f"The seed paper's artifact (Kyung, Yun, Ahn, CAL 2025) exactly: H100 SXM, DDR5 and SSD offload over a "
            f"{link_bytes_per_s / GB:.0f} GB/s NVLink-C2C link with the SSD assumed to keep up; no link energy, no "
            f"latencies. The artifact also subtracts the offload bandwidth from the HBM bandwidth left for compute "
            f"while copying."),
        gpu=KYUNG_H100, ddr=_kyung_ddr(link_bytes_per_s), ssd=ssd or _kyung_ssd(link_bytes_per_s),
        host_link=link, ssd_link=ssd_link or link, gpudirect_storage=True, nvlink=KYUNG_NVLINK4,
        gpus_per_node=8, internode=KYUNG_INFINIBAND,
        sources={"gpudirect_storage": f"{_P}: SSD bits cost 102.4 + 4.2 (HBM write) pJ/bit, no DDR hop",
                 "gpus_per_node": f"{_P}: figure_4_and_5.py runs DeepSeek-R1 as num_node 4 x num_device 8"},
    )


_ROWS = (
    HardwareProfile(
        name="h100-pcie5",
        description="Single-GPU default: H100 SXM, DDR5 host memory, PCIe Gen5 x16 host link, Samsung PM1743 Gen5 SSD.",
        gpu=H100_SXM, ddr=DDR5_HOST, ssd=SAMSUNG_PM1743, host_link=PCIE_GEN5_X16, ssd_link=PCIE_GEN5_X4,
        gpudirect_storage=True, nvlink=NVLINK4,
        sources={"gpudirect_storage": _GDS_ON},
    ),
    HardwareProfile(
        name="h100-pcie4",
        description="H100 SXM on a PCIe Gen4 host with a Samsung 990 PRO Gen4 SSD.",
        gpu=H100_SXM, ddr=DDR5_HOST, ssd=SAMSUNG_990_PRO, host_link=PCIE_GEN4_X16, ssd_link=PCIE_GEN4_X4,
        gpudirect_storage=True, nvlink=NVLINK4,
        sources={"gpudirect_storage": _GDS_ON},
    ),
    HardwareProfile(
        name="h200-pcie5",
        description="As h100-pcie5 with an H200 (141 GB HBM3E, 4.8 TB/s).",
        gpu=H200, ddr=DDR5_HOST, ssd=SAMSUNG_PM1743, host_link=PCIE_GEN5_X16, ssd_link=PCIE_GEN5_X4,
        gpudirect_storage=True, nvlink=NVLINK4,
        sources={"gpudirect_storage": _GDS_ON},
    ),
    HardwareProfile(
        name="gh200-c2c",
        description=("As h100-pcie5 but the host link is NVLink-C2C, the GH200 pairing: 900 GB/s total, 450 GB/s each "
                     "way. GPU, host memory and SSD are kept as in h100-pcie5 so only the link differs."),
        gpu=H100_SXM, ddr=DDR5_HOST, ssd=SAMSUNG_PM1743, host_link=NVLINK_C2C, ssd_link=PCIE_GEN5_X4,
        gpudirect_storage=True, nvlink=NVLINK4,
        sources={"gpudirect_storage": _GDS_ON},
    ),
    HardwareProfile(
        name="desktop-5070ti",
        description=("FlashMoE's on-device setting: RTX 5070 Ti (16 GB GDDR7) over PCIe 5.0, a 7.4 GB/s NVMe SSD "
                     "and about 1 GB of free DRAM."),
        gpu=RTX_5070_TI, ddr=DESKTOP_DDR5, ssd=FLASHMOE_NVME,
        host_link=_revised(PCIE_GEN5_X16, name="PCIe Gen5 x16 (desktop)",
                           bandwidth_bytes_per_s=(35.2 * GB, ("[DER] assumption: the H100 host-to-device measurement "
                                                              f"(nvbandwidth#24 in {_HW_MD}) reused; none found for "
                                                              "this card"))),
        ssd_link=PCIE_GEN4_X4, gpudirect_storage=False, nvlink=None,
        sources={"gpudirect_storage": "[DER] GeForce cards are not among GDS-supported GPUs; reads bounce through DRAM"},
    ),
    _kyung_profile("kyung2025", 900 * GB),
    _kyung_profile("kyung2025-c2c450", 450 * GB),
    # Beyond the paper, one assumption at a time (and both together): energies stay the paper's.
    _kyung_profile("kyung2025-nvme", 900 * GB, ssd=KYUNG_REAL_SSD, ssd_link=KYUNG_REAL_SSD_LINK,
                   description=("kyung2025 with a real NVMe SSD per GPU (Samsung PM1743: 13 GB/s, 2.5M IOPS, queue "
                                "depth and latency) on its PCIe Gen5 x4 link instead of an SSD that keeps up with "
                                "the 900 GB/s link; the paper's energies.")),
    _kyung_profile("kyung2025-pcie5", PCIE_GEN5_X16.bandwidth_bytes_per_s, link=PCIE_GEN5_X16,
                   description=("kyung2025 with the GPU's offload link a PCIe Gen5 x16 (35.2 GB/s measured, 11.4 "
                                "pJ/bit PHY energy) instead of 900 GB/s NVLink-C2C; the SSD still keeps up with it.")),
    _kyung_profile("kyung2025-pcie5-nvme", PCIE_GEN5_X16.bandwidth_bytes_per_s, link=PCIE_GEN5_X16,
                   ssd=KYUNG_REAL_SSD, ssd_link=KYUNG_REAL_SSD_LINK,
                   description=("kyung2025 with both: a PCIe Gen5 x16 host link (with its 11.4 pJ/bit, as "
                                "kyung2025-pcie5) and a real PM1743 NVMe SSD per GPU on PCIe Gen5 x4 (no link energy, "
                                "as kyung2025-nvme); the paper's other energies.")),
)

PROFILES: dict[str, HardwareProfile] = {profile.name: profile for profile in _ROWS}


def profile_names() -> list[str]:
    """The catalog keys, sorted."""
    return sorted(PROFILES)


def get_profile(name: str) -> HardwareProfile:
    """The profile called ``name`` (case-insensitive); :class:`TierflowError` listing valid names if unknown."""
    return lookup(PROFILES, name, "hardware profile", "profiles")
