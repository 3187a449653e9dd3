"""The Python API, in the spirit of GPTQModel:

    cfg = QuantizeConfig(bits=4, group_size=128, method="rtn")
    m = qforge.load("smollm2-135m", cfg)
    m.quantize("builtin:mix")          # a SPEC, a CalibrationSet, or a list of 1-D token tensors
    m.save("out/")
    qforge.evaluate("out/", datasets=["wiki", "code"])
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .calibration import CalibrationSet, build_calibration
from .checkpoint import is_qforge_output, read_config, read_kv_scales, read_layers, save_output
from .config import CalibrationConfig, QuantizeConfig, SimulationConfig
from .errors import QForgeError
from .eval import load_eval_text, perplexity
from .models import load_model
from .models.packed import input_acts, load_packed, packed_format
from .pipeline import QuantizeResult, quantize_model
from .solvers import InputScheme
from .storage import model_storage
from .utils.device import check_device
from .utils.runrecord import run_record

log = logging.getLogger(__name__)


class QModel:
    """A loaded causal LM with its tokenizer, quantization config and (once quantized) results."""

    def __init__(self, model, tokenizer, source: str, config: QuantizeConfig | None = None,
                 result: QuantizeResult | None = None, packed_format: str | None = None, blocks=None):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.blocks = blocks                # streamed (load(stream=True)): the models.streaming.BlockLoader
        self._output = Path(source) if blocks is not None and result is not None else None   # streamed, saved
        self.config = config
        self.result = result
        self.packed_format = packed_format  # set when loaded from a gptq/awq/compressed-tensors checkpoint
        self.packed_inputs: InputScheme | None = None   # a packed checkpoint's input scheme (compressed-tensors W8A8)
        self.calibration: CalibrationSet | None = None
        self.calibration_config: CalibrationConfig | None = None
        self._store = None                  # runstate.BlockStore of the last quantize(resume=...), until saved
        self.source_types: dict[str, str] | None = None   # loaded from GGUF: {parameter: GGML type stored as}
        self._source_warning: str | None = None           # quantize()'s, recorded by save()
        self._rotation: dict | None = None                 # rotate()'s record, once rotated

    @property
    def quantized(self) -> bool:
        return self.result is not None

    @property
    def input_scheme(self) -> InputScheme | None:
        """How the quantized linears' inputs are quantized as the model runs (W8A8; evaluate() and generate apply it
        with eval.simulate.quantized_activations), None for weight-only models."""
        if self.packed_format is not None:
            return self.packed_inputs
        return self.config.input_scheme if self.config is not None and self.quantized else None

    @property
    def act_bits(self) -> int | None:
        """The bits of those inputs (8), None for weight-only models."""
        return self.input_scheme.bits if self.input_scheme is not None else None

    @property
    def act_fp8(self) -> bool:
        """Whether those inputs are quantized to FP8 (E4M3, FP8_DYNAMIC) rather than int8."""
        return self.input_scheme is not None and self.input_scheme.fp8

    def quantized_inputs(self):
        """A context in which the model's quantized linears see their inputs quantized as the model is served
        (W8A8); nothing changes for a weight-only model."""
        from .eval.simulate import quantized_activations

        acts = self.input_scheme
        return quantized_activations(self.model, acts, set(self.result.layers) if acts is not None else None,
                                     self.input_scales)

    @property
    def kv_scales(self) -> dict[str, torch.Tensor] | None:
        """FP8 KV cache scales (kv_cache "fp8", or a checkpoint with a kv_cache_scheme): {"<attention>.k_scale" /
        ".v_scale": fp32 [1]}; evaluate() and generate cast keys and values to E4M3 with them. None: no FP8 cache."""
        return (self.result.kv_scales or None) if self.result is not None else None

    def kv_cache_factory(self, keep: bool = True):
        """A zero-argument callable making a fresh cache that casts keys and values to E4M3 with the model's
        kv_scales (pass one as past_key_values to a forward or generate), or None for a model without them.
        `keep` False: the cache keeps nothing (a streamed evaluation's blocks, one forward without a past)."""
        from .eval.simulate import kv_cache_factory

        return kv_cache_factory(self.model, 8, fp8=True, scales=self.kv_scales, keep=keep) if self.kv_scales \
            else None

    @property
    def input_scales(self) -> dict[str, torch.Tensor] | None:
        """Static input scales (act_static, or a checkpoint with `dynamic: false` inputs): {layer: input_scale [1]}
        (NVFP4 inputs: their global scales); None when the inputs are quantized per token as the model runs, or not
        at all."""
        scales = {n: q.input_scale for n, q in (self.result.layers if self.result else {}).items()
                  if q.input_scale is not None}
        return scales or None

    def quantize(self, calibration: str | CalibrationSet | list[torch.Tensor] | None = CalibrationConfig.source, *,
                 nsamples: int = CalibrationConfig.nsamples, seqlen: int = CalibrationConfig.seqlen,
                 seed: int = 0, device: str = "cpu",
                 batch_size: int = 8, show_progress: bool = False, allocation=None,
                 resume: str | Path | None = None, probe_memory: int | None = None) -> QuantizeResult:
        """Quantize in place. `allocation` (a mixed.plan.Allocation, e.g. `Allocation.load("allocation.json")`)
        gives every linear its scheme instead of measuring and planning for config.bpw; with
        config.search_generations the search continues from it (on config.measurement's options).
        `resume`: a directory where each calibrated block is saved as it finishes (runstate.py); a run
        interrupted there continues after its last finished block when started again with the same
        settings and data. save() removes it once the output is written. `probe_memory` (bytes; streamed mixed
        precision): room for the end-to-end probes' activations (mixed.measure.PROBE_MEMORY when None)."""
        if self.config is None:
            raise QForgeError("no QuantizeConfig: pass one to qforge.load(model, config)")
        if self.quantized:
            raise QForgeError("this model is already quantized")
        if self.blocks is not None:
            if self.config.search_generations:
                raise QForgeError("mixed precision's search runs the whole model once per candidate and does not "
                                  "stream (the measurement and verification do): search without stream, then "
                                  "quantize streamed with that allocation")
            if resume is None:
                raise QForgeError("a streamed model keeps each finished block on disk: give resume=DIR")
        if self.config.act_bits is not None:
            self._check_input_quantizable()
        if self.config.kv_cache:
            from .capture.kv_range import check_calibratable

            check_calibratable(self.model)
        check_device(device)
        resolved = self.config.for_device(device)           # compute_dtype "auto": what this device runs fastest
        if resolved is not self.config:
            log.info("compute_dtype auto: %s on %s", resolved.compute_dtype, device)
            self.config = resolved                          # saved with the output as the dtype that ran
        rotated = self.rotate()
        self._source_warning = None
        if allocation is None and not (self.config.bpw or self.config.nvfp4 or self.config.mx or rotated):
            from .models.arch import arch_spec
            from .models.gguf import source_grid_warning

            self._source_warning = source_grid_warning(self.source_types, arch_spec(self.model).blocks,
                                                       self.config.bits, self.config.group_size)
            if self._source_warning:
                log.warning("%s", self._source_warning)
        samples = None
        if self.config.needs_calibration:
            if calibration is None:
                raise QForgeError(f"method {self.config.method!r} needs calibration data")
            if isinstance(calibration, str):
                self.calibration_config = CalibrationConfig(calibration, nsamples, seqlen, seed)
                calibration = build_calibration(calibration, self.tokenizer, nsamples, seqlen, seed)
            if isinstance(calibration, CalibrationSet):
                self.calibration = calibration
                samples = calibration.samples
            else:
                from .calibration.checks import token_samples

                samples = token_samples(calibration, self.model.get_input_embeddings().num_embeddings)
        torch.manual_seed(seed)
        if allocation is not None:
            self._check_allocation(allocation)
        if self.config.search_generations and allocation is None and not self.config.bpw:
            raise QForgeError("search_generations searches a mixed-precision allocation: give bpw or an allocation")
        if self.config.search_generations if allocation is not None else self.config.bpw:
            allocation = self._allocate(samples, device, batch_size, show_progress, start=allocation,
                                        probe_memory=probe_memory)
        grids = allocation.grids if allocation else None
        store = None
        if resume is not None and (self.config.needs_calibration or self.blocks is not None):
            from .models.arch import arch_spec, get_blocks
            from .runstate import BlockStore, run_key, weights_fingerprint

            n_blocks = len(get_blocks(self.model, arch_spec(self.model)))
            weights = self.blocks.fingerprint() if self.blocks is not None else weights_fingerprint(self.model)
            store = BlockStore(resume, run_key(self.config.to_dict(), samples or [], self.source, n_blocks,
                                               grids or {}, weights))
        self.result = quantize_model(self.model, self.config, samples, device=device, batch_size=batch_size,
                                     show_progress=show_progress, grids=grids, store=store, weights=self.blocks)
        self._store = store
        self.result.allocation = allocation
        self.result.rotation = rotated
        if self.config.kv_cache:
            self.result.kv_scales = self._calibrate_kv(samples, device, batch_size)
        if self.result.ragged_layers:
            log.warning("%d layer(s) have a ragged last group (group size %d does not divide their input "
                        "width), e.g. %s", len(self.result.ragged_layers), self.config.group_size,
                        self.result.ragged_layers[0])
        return self.result

    def rotate(self) -> dict | None:
        """Rotate the model as config.rotation says (smoothing/rotate.py), once, before anything reads its weights:
        in memory, or, streamed, as its loader reads each block and the weights outside them. quantize() calls it
        first; call it yourself to measure the rotated model (qforge measure --rotate). Returns the record of what
        was done (None without config.rotation)."""
        from .smoothing.rotate import rotate_model, rotate_streamed

        if self.config is None or not self.config.rotation:
            return None
        if self._rotation is None:
            if self.blocks is not None:
                self._rotation = rotate_streamed(self.model, self.blocks, self.config.rotation,
                                                 self.config.rotation_seed)
            else:
                self._rotation = rotate_model(self.model, self.config.rotation, self.config.rotation_seed)
        elif (self._rotation["kind"], self._rotation["seed"]) != (self.config.rotation, self.config.rotation_seed):
            raise QForgeError(f"this model was rotated ({self._rotation['kind']}, seed {self._rotation['seed']}) "
                              f"already: load it again to rotate it otherwise")
        return self._rotation

    def _calibrate_kv(self, samples: list[torch.Tensor], device: str, batch_size: int) -> dict[str, torch.Tensor]:
        """FP8 KV scales (capture/kv_range.py) from the quantized model run as served (its inputs quantized too; a
        streamed one block by block, from its run state); their time counts in the run's seconds."""
        from .capture.blocks import make_batches
        from .capture.kv_range import kv_scales, observe_kv
        from .models.streaming import SavedBlocks

        t0 = time.perf_counter()
        streamed = None
        if self.blocks is not None:
            streamed = (self.blocks.outside, SavedBlocks(self.blocks, store=self._store).running)
        else:
            self.model.to(device)
        try:
            with self.quantized_inputs():
                scales = kv_scales(observe_kv(self.model, make_batches(samples, batch_size), device, streamed))
        finally:
            if streamed is None:
                self.model.to("cpu")
        seconds = time.perf_counter() - t0
        self.result.seconds += seconds
        log.info("FP8 KV scales of %d attention layers calibrated in %.1f s", len(scales) // 2, seconds)
        return scales

    def _check_input_quantizable(self) -> None:
        """W8A8 quantizes each quantized linear's input where it enters the module; an expert of a fused 3-D
        parameter is not a module (qforge's evaluation could not quantize its input, vLLM would): refused."""
        from .pipeline import quantized_linears

        fused = [n for n, r in quantized_linears(self.model, self.config).items() if r.expert is not None]
        if fused:
            raise QForgeError(f"W{self.config.bits}A{self.config.act_bits}: {len(fused)} quantized linears are "
                              f"experts of fused parameters (first: {fused[0]}), whose inputs qforge cannot quantize "
                              f"in evaluation; quantize this model weight-only, or leave them out: --skip "
                              f"'*.experts.*' (QuantizeConfig(..., skip=('*.experts.*',)))")

    def _check_allocation(self, allocation) -> None:
        """An allocation names this model's block linears (an allocation of another model is refused)."""
        from .models.arch import arch_spec, named_block_linears

        if self.config.method != "gptq":
            raise QForgeError(f"an allocation needs method gptq, got {self.config.method!r}")
        spec = arch_spec(self.model)
        names = set(named_block_linears(self.model, spec))
        foreign = sorted(set(allocation.layers) - names)
        if foreign:
            raise QForgeError(f"the allocation names {len(foreign)} layer(s) this model does not have, e.g. "
                              f"{foreign[0]}: it was planned for another model")

    def _allocate(self, samples, device: str, batch_size: int, show_progress: bool, start=None,
                  probe_memory: int | None = None):
        """Mixed precision: measure (or reuse / resume config.measurement), then choose the schemes (or take
        `start`'s), then search when config.search_generations asks."""
        import tempfile

        from .mixed import plan
        from .mixed.measure import PROBE_MEMORY
        from .mixed.plan import only_widths, restate_costs

        cfg = self.config
        probe_memory = probe_memory or PROBE_MEMORY
        if cfg.measurement:
            m = self._measurement(Path(cfg.measurement), samples, device, batch_size, show_progress, probe_memory)
        else:
            with tempfile.TemporaryDirectory() as d:             # nothing to keep: measured for this run only
                m = self._measurement(Path(d) / "measurement.json", samples, device, batch_size, show_progress,
                                      probe_memory)
        m = restate_costs(m, cfg.bpw_format)
        if cfg.bpw_bits:
            m = only_widths(m, cfg.bpw_bits)
        units = self._units(m)
        if start is not None:
            a = start
        elif cfg.verify_samples:
            from .mixed.verify import verified_plan

            a = verified_plan(self.model, m, cfg.bpw, samples, samples[:cfg.verify_samples], cfg, cfg.skip,
                              device=device, batch_size=batch_size, show_progress=show_progress, weights=self.blocks,
                              probe_memory=probe_memory, units=units)
        else:
            a = plan(m, cfg.bpw, cfg.skip, units=units)
        if not cfg.search_generations:
            return a
        from .mixed.search import searched_allocation

        return searched_allocation(self.model, m, a, samples, samples[:cfg.search_samples], cfg,
                                   cfg.search_generations, cfg.search_offspring, span=cfg.search_span, device=device,
                                   batch_size=batch_size, show_progress=show_progress, units=units)

    def _units(self, measurement: dict) -> dict[str, tuple[str, ...]] | None:
        """What takes one scheme, as config.bpw_units says: the fused sets of the measured linears, or None."""
        if self.config.bpw_units == "linear":
            return None
        from .models.arch import arch_spec
        from .models.fused import fused_sets

        return fused_sets(arch_spec(self.model), measurement["layers"])

    def _measurement(self, path: Path, samples, device: str, batch_size: int, show_progress: bool,
                     probe_memory: int):
        """The finished measurement at `path`, measured (or resumed) there first when it is not finished."""
        from .mixed import load_measurement, measure_model
        from .mixed.measure import settings_mismatch

        cfg = self.config
        try:
            if path.is_file():
                m = load_measurement(path)
                differ = settings_mismatch(m, cfg)
                if differ:
                    log.warning("%s was measured with other GPTQ settings (%s differ): its errors rank the schemes "
                                "for that solver, not this one; measure again for an exact allocation", path,
                                ", ".join(differ))
                return m
        except QForgeError:
            pass                                                 # unfinished: measure_model resumes it
        identity = {"model": self.source, "calibration": self.calibration_config.to_dict()
                    if self.calibration_config else f"{len(samples)} samples"}
        return measure_model(self.model, samples, path, cfg, cfg.bpw_format, cfg.bpw_bits or None, identity=identity,
                             device=device, batch_size=batch_size, show_progress=show_progress, weights=self.blocks,
                             probe_memory=probe_memory)

    def check_export(self, fmt: str, allocation=None) -> None:
        """Raise QForgeError now if quantizing with this config (or `allocation`'s schemes) would give layers
        `fmt` cannot store: call it before a long quantization that is meant to be exported."""
        from .export import check_exportable

        if self.config is None:
            raise QForgeError("no QuantizeConfig: pass one to qforge.load(model, config)")
        check_exportable(self.model, self.config, fmt, allocation.grids if allocation is not None else None)

    def export(self, out: str | Path, fmt: str = "gptq", dtype: torch.dtype = torch.float16,
               overwrite: bool = False, max_shard_size: str | int = "4GB") -> dict:
        """Write a packed checkpoint (formats: gptq, compressed-tensors, awq); returns its measured sizes."""
        from .export import export

        if not self.quantized:
            raise QForgeError("nothing to export: call quantize() first")
        if self.packed_format is not None:
            raise QForgeError(f"{self.source} is a packed {self.packed_format} checkpoint already")
        if self.blocks is not None:
            from .export import export_streamed
            from .models.streaming import SavedBlocks

            if self._output is not None:
                blocks = SavedBlocks(self._output_loader(), output=self._output)
            elif self._store is not None:
                blocks = SavedBlocks(self.blocks, store=self._store)
            else:
                raise QForgeError("this streamed run's blocks are gone (drop_run_state() was called); quantize again")
            return export_streamed(self.model, self.tokenizer, self.config, blocks, out, fmt, dtype, overwrite,
                                   max_shard_size, self.result.allocation, self.result.kv_scales)
        return export(self.model, self.tokenizer, self.result.layers, self.config, out, fmt, dtype, overwrite,
                      max_shard_size, self.result.allocation, self.result.kv_scales)

    def _output_loader(self):
        """A streamed run's blocks as saved in its output directory."""
        from .models.checkpoint_keys import converted
        from .models.streaming import BlockLoader, CheckpointFiles

        return BlockLoader(converted(CheckpointFiles(self._output), self.model), self.model)   # stored as saved

    def streamed_weights(self):
        """The loader of a streamed model's current weights (None when it is in memory): the source checkpoint's
        before quantize(), the saved output's after."""
        if self.blocks is None or not self.quantized or self.packed_format is not None:
            return self.blocks
        if self._output is None:
            raise QForgeError("a streamed run's quantized blocks are read from its saved output: call save() first")
        return self._output_loader()

    def storage(self) -> dict:
        layers = self.result.layers if self.result else {}
        cfg = self.config or QuantizeConfig()
        return model_storage(self.model, layers, cfg.act_order, cfg.static_groups)

    def save(self, out: str | Path, overwrite: bool = False, **record_fields) -> Path:
        if not self.quantized:
            raise QForgeError("nothing to save: call quantize() first")
        if self.packed_format is not None:
            raise QForgeError(f"{self.source} is a packed {self.packed_format} checkpoint; nothing new to save")
        if self.blocks is not None and self._store is None:
            raise QForgeError(f"{self.source}: this streamed run was saved already, or its run state dropped; "
                              f"nothing to save")
        from .models.gguf import type_counts

        record = run_record(
            source=self.source, source_types=type_counts(self.source_types),
            source_warnings=[self._source_warning] if self._source_warning else [],
            seed=(self.calibration_config.seed if self.calibration_config else None),
            quantize_seconds=round(self.result.seconds, 2), storage=self.storage(),
            ragged_layers=self.result.ragged_layers, rotation=self.result.rotation,
            calibration_warnings=self.calibration.warnings if self.calibration else [],
            layers=self.result.summary(), **record_fields)
        samples = self.calibration.samples if self.calibration else None
        saved = save_output(out, self.model, self.tokenizer, self.config, self.result.layers, record,
                           self.calibration_config, samples, overwrite, awq=self.result.awq,
                           smoothquant=self.result.smoothquant, kv_scales=self.result.kv_scales,
                           allocation=self.result.allocation,
                           streamed=(self._store, self.blocks) if self.blocks is not None else None)
        if self.blocks is not None:
            self._output = saved
        self.drop_run_state()                                # the output holds everything the run state did
        return saved

    def drop_run_state(self) -> None:
        """Remove the run state of the last quantize(resume=...), its finished blocks on disk, as save() does
        once the output is written. A streamed run kept there can then no longer be saved or exported."""
        if self._store is not None:
            self._store.clear()
            self._store = None


def load(model: str | Path, config: QuantizeConfig | None = None, stream: bool = False,
         dense_cache: bool = True) -> QModel:
    """Load a model spec. A qforge output directory comes back quantized, with its config and codes; a packed
    gptq/awq/compressed-tensors checkpoint comes back with QuantLinear modules and its codes.

    `dense_cache` (packed checkpoints): each QuantLinear keeps its dequantized weight after a first large input
    (fast prefill and evaluation on a CPU, at the dense model's memory); False keeps only the packed weights
    (bf16 on a CPU then takes the weight-only int4/int8 matmul at every batch size).

    `stream` (models larger than RAM, models/streaming.py): no weight is loaded yet; quantize() reads one
    block at a time (the weights outside the blocks only to capture the first block's inputs) and keeps each
    finished block in its `resume` directory; save() writes the output block by block and export() packs it
    block by block, from the saved output or, before save(), from the run state. A qforge output loaded this
    way can be exported and evaluated; a packed checkpoint, evaluated (its layers read with their blocks)."""
    model = str(model)
    if Path(model).is_dir() and packed_format(model) is not None:
        if config is not None:
            raise QForgeError(f"{model} is already quantized; load it without a QuantizeConfig")
        if stream:                      # evaluated block by block; its layers are read with their blocks
            from .models.streaming import load_streamed

            lm, blocks = load_streamed(model)
            q = QModel(lm.model, lm.tokenizer, model, None, QuantizeResult(layers={}, kv_scales=blocks.kv_scales()),
                       packed_format=blocks.fmt, blocks=blocks)
        else:
            net, tok, layers, fmt, kv = load_packed(model, cache_dequantized=dense_cache)
            q = QModel(net, tok, model, None, QuantizeResult(layers=layers, kv_scales=kv), packed_format=fmt)
        q.packed_inputs = input_acts(model)
        static = q.packed_inputs is not None and q.packed_inputs.static
        missing = [n for n, lq in q.result.layers.items() if static and lq.input_scale is None]
        if missing:
            raise QForgeError(f"{model}: its inputs are quantized with static scales, but {len(missing)} quantized "
                              f"layers store no input_scale (first: {missing[0]})")
        if not static:                  # the config says how the inputs are quantized: stray scales are not used
            for lq in q.result.layers.values():
                lq.input_scale = None
        return q
    if stream:
        from .models.streaming import load_streamed

        lm, blocks = load_streamed(model)
    else:
        lm, blocks = load_model(model), None
    if is_qforge_output(model):
        if config is not None:
            raise QForgeError(f"{model} is already quantized; load it without a QuantizeConfig")
        result = QuantizeResult(layers=read_layers(model, values=not stream), kv_scales=read_kv_scales(model))
        from .mixed.plan import ALLOCATION_FILE, Allocation

        if (Path(model) / ALLOCATION_FILE).is_file():                   # mixed precision: exports carry it
            result.allocation = Allocation.load(Path(model) / ALLOCATION_FILE)
        return QModel(lm.model, lm.tokenizer, model, read_config(model), result, blocks=blocks)
    q = QModel(lm.model, lm.tokenizer, model, config, blocks=blocks)
    q.source_types = lm.source_types
    return q


def tune_kernels(model: torch.nn.Module, device, picks: str | Path | None = None):
    """Have every packed layer (QuantLinear) of `model` run the Triton schedule measured fastest for its
    shape on `device` (one shared kernels.Tuner; each shape is timed on first use). `picks`: a file of
    earlier picks (Tuner.save) adopted where it exists, for GPUs of the same name. Returns the Tuner."""
    from .kernels import Tuner, use_tuner

    if torch.device(device).type != "cuda":
        raise QForgeError(f"kernel tuning times the Triton kernels on a CUDA device, not {device!r}")
    tuner = Tuner()
    if picks is not None and Path(picks).is_file():
        try:
            log.info("%d kernel picks adopted from %s", tuner.load(picks, device), picks)
        except (ValueError, KeyError, TypeError) as e:     # not a picks file (json errors are ValueErrors)
            raise QForgeError(f"{picks} is not a file of kernel picks (Tuner.save writes them): {e}") from e
    if use_tuner(model, tuner) == 0:
        log.warning("no packed layers to tune: only packed checkpoints (gptq/awq/compressed-tensors) run the kernels")
    return tuner


def evaluate(model: str | Path | QModel, datasets=("wiki", "brown", "news", "code"), seqlen: int = 2048,
             max_windows: int | None = None, device: str = "cpu", batch_size: int = 1,
             show_progress: bool = False, simulate: SimulationConfig | None = None,
             reference: str | Path | QModel | None = None, tune: bool = False,
             kernel_picks: str | Path | None = None, stream: bool = False) -> list[dict]:
    """Perplexity on each dataset SPEC by the shared protocol; one record per dataset.

    `stream` (a path; a streamed QModel always is): the model is read and run one decoder block at a time over
    every window (eval/streamed.py), for models larger than RAM: perplexity only, no simulation, reference or
    kernel tuning.

    `simulate` applies simulated quantization first (SmoothQuant folding, RTN weights, then per-token
    activations and the KV cache during the forward; a QModel passed in is changed in place); `reference`
    adds KLD / top-1 / Δp against that model, computed from the same forward passes. `tune`: tune_kernels
    (a packed checkpoint on CUDA), with its picks read from and saved back to `kernel_picks` if given."""
    from .eval.compare import ReferenceComparison
    from .eval.simulate import kv_cache_factory, quantized_activations

    check_device(device)
    qm = model if isinstance(model, QModel) else load(model, stream=stream)
    sim = simulate or SimulationConfig()
    weights = qm.streamed_weights()
    if weights is not None and (sim.active or reference is not None or tune):
        raise QForgeError("a streamed evaluation measures perplexity only: no simulated quantization, reference "
                          "or kernel tuning")
    if weights is not None and qm.act_bits is not None:
        raise QForgeError(f"{qm.source} quantizes its linears' inputs to {qm.act_bits} bits, which a streamed "
                          f"evaluation does not do: evaluate it without stream")
    if qm.kv_scales is not None and sim.kv_bits is not None:
        raise QForgeError(f"{qm.source} quantizes its KV cache to FP8 with calibrated scales already; the simulated "
                          f"KV cache (kv_bits {sim.kv_bits}) would quantize it again")
    if qm.act_bits is not None and sim.act_bits not in (None, qm.act_bits):
        raise QForgeError(f"{qm.source} quantizes its linears' inputs to {qm.act_bits} bits already; "
                          f"--act-bits {sim.act_bits} would quantize them again")
    if sim.active:
        _apply_simulated_weights(qm, sim, batch_size)
    ref = None if reference is None else reference if isinstance(reference, QModel) else load(reference)
    if ref is not None:
        ref.model.to(device)
    tuner = tune_kernels(qm.model, device, kernel_picks) if tune else None
    if weights is None:
        qm.model.to(device)
    make_cache = qm.kv_cache_factory(keep=weights is None) or \
        kv_cache_factory(qm.model, sim.kv_bits, sim.kv_group_size, sim.kv_fp8)
    rows = []
    # a W8A8 model's own input quantization (its quantized linears), else the simulation's (every table linear)
    with qm.quantized_inputs() if qm.act_bits is not None else quantized_activations(qm.model, sim.input_scheme):
        for spec in ([datasets] if isinstance(datasets, str) else datasets):
            text = load_eval_text(spec)
            t0 = time.perf_counter()
            comparison = ReferenceComparison(ref.model) if ref is not None else None
            r = perplexity(qm.model, qm.tokenizer, text, seqlen, max_windows, device, batch_size,
                           desc=f"ppl {spec}", show_progress=show_progress, make_cache=make_cache, on_logits=comparison,
                           weights=weights)
            row = {"model": qm.source, "dataset": spec, **r}
            if sim.active:
                row["simulation"] = sim.to_dict()
            if qm.act_bits is not None:
                row["act_bits"] = qm.act_bits
                if qm.act_fp8:
                    row["act_fp8"] = True
                if qm.input_scales is not None:
                    row["act_static"] = True
                if qm.input_scheme.group_size > 0:
                    row["act_group_size"] = qm.input_scheme.group_size
                if qm.input_scheme.mx or qm.input_scheme.fp4:
                    row["act_format"] = "MX" if qm.input_scheme.mx else "NVFP4"
            if qm.kv_scales is not None:
                row["kv_cache"] = "fp8"
            if comparison is not None:
                row["reference"] = {"model": ref.source, **comparison.result()}
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            log.info("%s on %s: ppl %.3f (%d windows x %d)", qm.source, spec, r["ppl"], r["windows"], seqlen)
    if tuner is not None and kernel_picks is not None:
        tuner.save(kernel_picks)
    return rows


def _apply_simulated_weights(qm: QModel, sim: SimulationConfig, batch_size: int) -> None:
    """The rotation, SmoothQuant (both need fp weights), then RTN weights, on `qm` in place."""
    from .smoothing.smoothquant import smooth_model

    if qm.quantized and (sim.smoothquant is not None or sim.weight_bits or sim.rotation):
        raise QForgeError(f"{qm.source} is already quantized: rotation, SmoothQuant and simulated weight bits need "
                          f"the unquantized model (pass it, with --w-bits for the weights)")
    if sim.rotation is not None:
        from .smoothing.rotate import rotate_model

        rotate_model(qm.model, sim.rotation)
    if sim.smoothquant is not None:
        c = sim.calib
        calib = build_calibration(c.source, qm.tokenizer, c.nsamples, c.seqlen, c.seed)
        smooth_model(qm.model, calib.samples, sim.smoothquant, batch_size=max(batch_size, 4))
    if sim.weight_bits:
        qm.config = QuantizeConfig(method="rtn", bits=sim.weight_bits, group_size=sim.weight_group_size, fp8=sim.fp8)
        qm.quantize(None)
