"""The architecture table's record types: ArchSpec (one model family) and SmoothMapping (one AWQ/SmoothQuant fold).

An ArchSpec names the ModuleList of decoder blocks and the quantizable linears of one block as
groups in execution order (q/k/v, then o, then gate/up, then down for Llama-like blocks); a group's
linears read one input tensor (parallel blocks put attention's and the MLP's input linears in one group).
A linear name is a module path inside the block, or the path of a 3-D fused-experts parameter
([experts, out, in], as transformers 5 stores MoE experts), which expands to one linear per expert.
`smooth` lists AWQ/SmoothQuant mappings (previous op -> the linears that read its output).
Families whose blocks differ (dense and MoE blocks in one model) list every block kind's linears and
mark the ones a block may lack `optional`; a mapping applies in the blocks that hold all it names.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import QForgeError

PREV_ROWS = {"all": 1, "up_half": 2, "v_third": 3}  # equal parts of prev's rows; the linears read the last


@dataclass(frozen=True)
class SmoothMapping:
    """`prev` (a norm or linear inside the block) feeds every linear in `linears` (AWQ, SmoothQuant).

    `balance`: modules that read prev's output too but are never quantized (MoE routers): scaled with
    the linears so the function is unchanged. `prev_rows` says which of prev's output rows the linears read:
    "all"; "up_half": prev is a fused gate/up (a linear [2·I, in], or a fused-experts parameter
    [experts, 2·I, in] whose linears are fused experts too, one scale vector per expert) and the linears
    read act(gate)·up, so only the up rows are divided; "v_third": prev is a fused q/k/v linear whose last
    third (v) the linears read — it fits only when there are as many key/value heads as query heads.
    """

    prev: str
    linears: tuple[str, ...]
    balance: tuple[str, ...] = ()
    prev_rows: str = "all"

    def __post_init__(self):
        if self.prev_rows not in PREV_ROWS:
            raise QForgeError(f"SmoothMapping {self.prev}: prev_rows must be one of {', '.join(PREV_ROWS)}, "
                              f"not {self.prev_rows!r}")


@dataclass(frozen=True)
class ArchSpec:
    blocks: str                          # dotted path of the decoder-block ModuleList in the CausalLM
    groups: tuple[tuple[str, ...], ...]  # linears per block, in execution order
    smooth: tuple[SmoothMapping, ...] = ()
    norm_plus_one: bool = False          # Gemma RMSNorm scales by (1 + w)
    optional: frozenset[str] = frozenset()  # linears some blocks lack (dense vs MoE blocks)
    fp_linears: tuple[str, ...] = ()     # linears that stay unquantized (a shared expert's 1-output gate)
    tuple_blocks: bool = False           # the model reads a block's output as a tuple, (hidden, ...) (Bloom, GPT-J)

    def __post_init__(self):
        names = set(self.linear_names)
        unknown = (set(self.optional) | {n for m in self.smooth for n in m.linears}) - names
        if unknown:
            raise QForgeError(f"ArchSpec {self.blocks}: {', '.join(sorted(unknown))} not among its groups' linears")

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)
