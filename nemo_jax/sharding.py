"""Mesh construction and the logical -> mesh axis rules. The ONLY place mesh axes are named.

Mesh axes:  data (pure data parallel), fsdp (data parallel with parameters sharded, ZeRO-3 style),
            tensor (heads / kv heads / FFN / vocab), sequence (tokens of one sequence).

Every parameter carries logical axis names (model.py); `RULES` maps each to a mesh axis (or None =
replicated). XLA's SPMD partitioner inserts the collectives: under fsdp a scanned layer's weights
are all-gathered inside the scan body, one layer at a time.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nemo_jax.errors import UserError

AXES = ("data", "fsdp", "tensor", "sequence")

# logical axis -> mesh axis. Parameters are sharded over fsdp (and sequence) on their `embed` dimension and over
# tensor on their head/FFN/vocab dimension; the stacked layer axis stays whole (scan slices it).
RULES = {
    "batch": ("data", "fsdp"),
    "length": "sequence",
    "embed": ("fsdp", "sequence"),  # sequence-parallel devices hold the same weights: shard them too
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "lora_rank": None,
    "quant_blocks": ("fsdp", "sequence"),  # a quantised kernel's flat per-layer codes and scales (quant_base.py)
    "act_embed": None,  # activations keep D whole: weights are gathered, not activations
}


def mesh_shape(data: int, fsdp: int, tensor: int, sequence: int, n_devices: int) -> dict[str, int]:
    """Resolve the one -1 entry (if any) to fill the devices; check the product."""
    shape = dict(data=data, fsdp=fsdp, tensor=tensor, sequence=sequence)
    fill = [k for k, v in shape.items() if v == -1]
    if len(fill) > 1:
        raise UserError(f"mesh: at most one axis may be -1, got {', '.join('mesh.' + k for k in fill)}")
    known = math.prod(v for v in shape.values() if v != -1)
    if fill:
        if n_devices % known:
            raise UserError(f"mesh: {n_devices} devices cannot be split with the other axes' product {known}")
        shape[fill[0]] = n_devices // known
    if math.prod(shape.values()) != n_devices:
        raise UserError(f"mesh: data*fsdp*tensor*sequence = {math.prod(shape.values())} but there are "
                        f"{n_devices} devices (set one axis to -1 to fill)")
    return shape


def make_mesh(data=1, fsdp=1, tensor=1, sequence=1, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(data, fsdp, tensor, sequence, len(devices))
    arr = np.asarray(devices).reshape([shape[a] for a in AXES])
    # Auto: XLA's partitioner propagates shardings between the constraints we set (params, batch,
    # block boundaries) rather than requiring every intermediate to be typed.
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def logical_to_spec(axes: tuple, mesh: Mesh, shape: tuple | None = None) -> P:
    """PartitionSpec for a tensor with these logical axes; an axis the mesh cannot divide stays whole.

    That fallback is what lets e.g. 8 kv heads live on a 16-way tensor axis (replicated there).
    """
    out, used = [], set()
    for i, name in enumerate(axes):
        mesh_axes = RULES.get(name)
        if mesh_axes is None:
            out.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or (shape is not None and shape[i] % size):
            out.append(None)
            continue
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def tree_shardings(logical_tree, abstract_tree, mesh: Mesh):
    """NamedShardings for a tree, given its logical axes (PartitionSpecs of names) and shapes."""
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(tuple(axes), mesh, x.shape)),
        logical_tree, abstract_tree, is_leaf=lambda x: isinstance(x, P))


def with_shardings(abstract_tree, shardings):
    """The tree's ShapeDtypeStructs carrying these shardings (what restores read straight into)."""
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract_tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh))


def process_rows(sharding: NamedSharding, shape: tuple[int, int]) -> tuple[int, int]:
    """(block, blocks): this process's devices hold rows [block * B / blocks, (block + 1) * B / blocks)
    of a [B, T] batch laid out by `sharding`, read from the devices' own slices (not the process
    index): where the batch is replicated across processes (a tensor or sequence axis spanning
    hosts), several processes hold, and feed, the same block."""
    spans = {(r.start, r.stop) for r in (range(shape[0])[idx[0]]
                                         for idx in sharding.addressable_devices_indices_map(shape).values())}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    n = hi - lo
    covered = np.zeros(n, bool)
    for a, b in spans:
        covered[a - lo:b - lo] = True
    if not covered.all() or shape[0] % n or lo % n:
        raise UserError(f"mesh: this process's devices hold rows {sorted(spans)} of the {shape[0]}-row batch, not "
                        f"one contiguous block of an even split; order the devices host by host (jax.devices())")
    return lo // n, shape[0] // n


def batch_split(mesh: Mesh) -> tuple[int, int]:
    """(ways the batch's rows are split, ways its positions are split) on `mesh`."""
    ways = lambda entry: math.prod(mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))
    rows, positions = (tuple(batch_sharding(mesh).spec) + (None, None))[:2]
    return ways(rows), ways(positions)


def describe(mesh: Mesh) -> str:
    """'fsdp=4, tensor=2': the mesh's axes of more than one device ('1 device' for none)."""
    return ", ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "1 device"


def parse_mesh(text: str, where: str = "mesh") -> dict[str, int]:
    """'fsdp=8' or 'data=2,tensor=4' -> make_mesh's keyword arguments (unnamed axes 1, one may be -1)."""
    shape = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not eq:
            raise UserError(f"{where} {text!r}: expected AXIS=N[,AXIS=N...] with AXIS among {', '.join(AXES)}")
        try:
            n = int(value)
        except ValueError:
            raise UserError(f"{where} {text!r}: {name}={value.strip()!r} is not an integer") from None
        if n < 1 and n != -1:
            raise UserError(f"{where} {text!r}: {name} must be a positive size or -1 (fill)")
        shape[name] = n
    if not shape:
        raise UserError(f"{where} {text!r}: expected AXIS=N[,AXIS=N...] with AXIS among {', '.join(AXES)}")
    return shape


def per_device(mesh: Mesh) -> NamedSharding:
    """A [mesh.size] vector, one element on each device (for per-process flags)."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_ACTIVE_MESH: list[Mesh] = []


@contextlib.contextmanager
def activation_mesh(mesh: Mesh):
    """While tracing under this context, `constrain` lays activations out on `mesh`."""
    _ACTIVE_MESH.append(mesh)
    try:
        yield
    finally:
        _ACTIVE_MESH.pop()


def active_mesh() -> Mesh | None:
    """The mesh of the program being traced (`activation_mesh`), or None outside one."""
    return _ACTIVE_MESH[-1] if _ACTIVE_MESH else None


def constrain(x, axes: tuple):
    """Pin an activation's layout by logical axes (a no-op outside `activation_mesh` or on one device).

    Without it XLA may keep the residual stream sharded like the last weight it met (D over fsdp) and
    re-gather it whole before every matmul."""
    if not _ACTIVE_MESH or _ACTIVE_MESH[-1].size == 1:
        return x
    mesh = _ACTIVE_MESH[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, mesh, x.shape)))
