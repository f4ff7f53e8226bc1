"""Which attention layers share a sequence's KV-cache blocks.

A model whose layers all read the same span (the whole context, or one window: Mistral) keeps one group: every
block holds one token range of every layer, and one block table per sequence says where. A model that mixes
windowed and global layers (Gemma: local and global in turn) gets a group per kind, each with a block table of
its own per sequence, so a windowed group's blocks go back as the window moves on while the global group keeps
all of them. All groups draw on one pool of blocks; a block holds one token range of `layers_per_block` layers,
the size of the smallest group (larger groups are cut into groups of that size, so no group leaves part of a
block unused when the sizes divide).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class KVLayerGroups:
    windows: tuple[int | None, ...]  # per group: the window its layers attend within; None: the whole context
    group_of_layer: tuple[int, ...]  # per attention layer (in model order)
    slot_of_layer: tuple[int, ...]  # per attention layer: which of a block's layer slices it reads and writes
    layers_per_block: int

    @property
    def num_groups(self) -> int:
        return len(self.windows)


def group_layers(windows: list[int | None], max_model_len: int, split_by_window: bool) -> KVLayerGroups:
    """The groups of layers with these windows (a window that covers max_model_len is none). Without
    split_by_window (a workflow that computes each sequence in one go and frees it) all layers are one group,
    whose window is the layers' own when they share one."""
    windows = [w if w is not None and w < max_model_len else None for w in windows]
    kinds = list(dict.fromkeys(windows))  # in the order the layers first show them
    if len(kinds) == 1 or not split_by_window:
        window = kinds[0] if len(kinds) == 1 else None
        return KVLayerGroups((window,), (0,) * len(windows), tuple(range(len(windows))), len(windows))
    by_kind = {kind: [i for i, w in enumerate(windows) if w == kind] for kind in kinds}
    per_block = min(map(len, by_kind.values()))
    group_windows, group_of, slot_of = [], [0] * len(windows), [0] * len(windows)
    for kind, layers in by_kind.items():
        for start in range(0, len(layers), per_block):
            for slot, layer in enumerate(layers[start:start + per_block]):
                group_of[layer], slot_of[layer] = len(group_windows), slot
            group_windows.append(kind)
    return KVLayerGroups(tuple(group_windows), tuple(group_of), tuple(slot_of), per_block)
