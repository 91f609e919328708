"""Running an exported refiner (`stage2-export`) with the eager model's call contract.

    from modeling_stage2.onnx_runtime import ExportedRefiner
    model = ExportedRefiner("runs/x/onnx")            # a stage2-export folder, or model.onnx / model.pt2 itself
    refined = model(opt_v1, month, biome).refined     # torch tensors or numpy arrays in, a torch tensor out
    model(opt_v1, month, biome).out_of_range_weight   # graphs of refiners that keep opt_v1 somewhere (keeps_opt_v1)

`ExportedRefiner` checks the input exactly as `Stage2RefinerModel.forward` does (same exceptions, same messages:
wrong band count, non-float or non-finite `opt_v1`, month/biome dtype, shape and range) before it runs the graph,
because the graph itself cannot. ONNX graphs run on ONNX Runtime (`pip install 'stage2-refiner[export]'`), `.pt2`
graphs on torch (`torch.export.load`). `inference_stage2` (and `stage2-refine --model`) accept it wherever
they accept the eager model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .configuration_stage2 import Stage2RefinerConfig
from .export import EXPORT_INFO_FILE, GRAPH_FILES, OUTPUT_NAMES, side_limits
from .pt2_archive import check_pt2_archive
from .vocabulary import OUT_OF_RANGE_WEIGHT, install_hint

_FORMATS_BY_SUFFIX = {".onnx": "onnx", ".pt2": "torch_export"}

__all__ = ["ExportedRefiner", "is_exported_model", "load_exported", "resolve_export"]


def is_exported_model(path: str | os.PathLike) -> bool:
    """True for a `.onnx` / `.pt2` file or a folder written by `stage2-export` (it holds `export.json`)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.suffix in _FORMATS_BY_SUFFIX
    return path.is_dir() and (path / EXPORT_INFO_FILE).is_file()


def _read_export_info(info_file: Path) -> dict[str, Any]:
    """`export.json`, checked for what the runtime reads from it; a ValueError naming the file and the key otherwise."""
    try:
        info = json.loads(info_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{info_file}: not valid JSON ({error}); export the refiner again with stage2-export"
                         ) from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_file}: expected a JSON object, got {type(info).__name__}")
    if info.get("format") not in GRAPH_FILES:
        raise ValueError(f"{info_file}: key 'format' is {info.get('format')!r}, expected one of {tuple(GRAPH_FILES)}")
    graph_file = info.get("graph_file", GRAPH_FILES[info["format"]])
    if not isinstance(graph_file, str) or Path(graph_file).name != graph_file or graph_file in ("", ".", ".."):
        raise ValueError(f"{info_file}: key 'graph_file' is {graph_file!r}, expected a file name in its folder "
                         f"(e.g. {GRAPH_FILES[info['format']]!r})")
    limits = info.get("shape_limits")
    if limits is not None and not (
        isinstance(limits, dict)
        and all(isinstance(limits[axis], list) and len(limits[axis]) == 2
                and all(isinstance(value, int) and not isinstance(value, bool) for value in limits[axis])
                for axis in ("batch", "height", "width") if axis in limits)
    ):
        raise ValueError(f"{info_file}: key 'shape_limits' is {limits!r}, expected [low, high] integers for batch, "
                         "height and width")
    return info


def resolve_export(path: Path, format: str | None) -> tuple[Path, str, dict[str, Any]]:
    """(graph file, format, export.json contents or {}) of `path`, a `stage2-export` folder (its `export.json` names
    the graph) or a `.onnx` / `.pt2` file (`format` from its suffix unless given; the `export.json` beside it read if
    there is one), without loading the graph. `FileNotFoundError` for a folder without `export.json` or the graph it
    names, or no such path; `ValueError` for an unreadable `export.json` or a file of another suffix."""
    if path.is_dir():
        info_file = path / EXPORT_INFO_FILE
        if not info_file.is_file():
            raise FileNotFoundError(f"{path}: no {EXPORT_INFO_FILE}; is it a folder written by stage2-export?")
        info = _read_export_info(info_file)
        graph = path / info.get("graph_file", GRAPH_FILES[info["format"]])
        if not graph.is_file():
            raise FileNotFoundError(f"{graph}: missing (named by {info_file})")
        return graph, info["format"], info
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    fmt = format or _FORMATS_BY_SUFFIX.get(path.suffix)
    if fmt is None:
        raise ValueError(f"{path}: expected a .onnx or .pt2 file, or a stage2-export folder")
    info_file = path.parent / EXPORT_INFO_FILE
    info = _read_export_info(info_file) if info_file.is_file() else {}
    return path, fmt, info


class ExportedRefiner:
    """An exported refiner with the call contract of `Stage2RefinerModel`: `model(opt_v1, month, biome)` returns a
    `Stage2RefinerOutput` whose `refined` is a float32 tensor (B, 4, H, W), and whose `out_of_range_weight` is the
    graph's (B, 1, H, W) weight of `opt_v1` where the graph has that output (`output_names`: a refiner built with
    `out_of_range_fallback` or `near_black_fallback`, exported by a version with that output), None otherwise. With
    `return_dict=False`: a tuple of the outputs the graph has, `refined` first.

    Args:
        path: a `stage2-export` folder, or the `model.onnx` / `model.pt2` file (its `config.json` is looked for
            beside it, else pass `config`).
        config: the refiner's config, when the graph has no `config.json` beside it.
        format: `"onnx"` or `"torch_export"` (default: from the folder or the file suffix).
        device: `"cpu"` (default) or `"cuda"`; ONNX graphs use the CUDA execution provider when ONNX Runtime has
            it and fall back to the CPU otherwise; a `.pt2` program is moved to the device whole.
        num_threads: intra-op threads of ONNX Runtime (default: torch's current thread count).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        config: Stage2RefinerConfig | None = None,
        format: str | None = None,
        device: str | torch.device | None = None,
        num_threads: int | None = None,
    ):
        self.path = Path(path).expanduser()
        self.graph_file, self.format, self.export_info = resolve_export(self.path, format)
        if config is None:
            config_file = self.graph_file.parent / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"{config_file}: missing; pass config= for a graph without its folder")
            config = Stage2RefinerConfig.from_pretrained(self.graph_file.parent)
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._checker = SimpleNamespace(config=config)
        if self.format == "onnx":
            self._session = self._onnx_session(num_threads)
            self.providers = self._session.get_providers()
            self._program = None
            names = tuple(output.name for output in self._session.get_outputs())
        elif self.format == "torch_export":
            self._session = None
            self.providers = ["torch"]
            check_pt2_archive(self.graph_file)  # torch.export.load may unpickle parts of a file: none may be there
            program = torch.export.load(str(self.graph_file))
            if self.device.type != "cpu":  # the graph names the CPU it was traced on (its `to`s and input checks)
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, self.device)  # not only the weights, as `.to()` moves
            self._program = program.module().to(self.device)
            # A .pt2 keeps no output names: the outputs are `OUTPUT_NAMES` in order.
            count = len(program.graph_signature.user_outputs)
            names = tuple(OUTPUT_NAMES[i] if i < len(OUTPUT_NAMES) else f"output_{i}" for i in range(count))
        else:
            raise ValueError(f"format must be 'onnx' or 'torch_export', got {self.format!r}")
        if names not in (OUTPUT_NAMES[:1], OUTPUT_NAMES):
            raise ValueError(f"{self.graph_file}: the graph's outputs are {names}; a Stage 2 refiner's are "
                             f"{OUTPUT_NAMES[:1]} or {OUTPUT_NAMES}")
        # What the graph computes, not what its config says: a graph exported before the weight became an output has
        # `refined` only, even from a refiner with `out_of_range_fallback`.
        self.output_names: tuple[str, ...] = names

    @property
    def reports_out_of_range_weight(self) -> bool:
        """Whether the graph returns `out_of_range_weight`."""
        return OUT_OF_RANGE_WEIGHT in self.output_names

    @property
    def max_batch(self) -> int | None:
        """The most tiles the graph takes in one call (`export.json`'s `shape_limits`), None where it names none."""
        limits = (self.export_info.get("shape_limits") or {}).get("batch")
        return int(limits[1]) if limits else None

    @property
    def side_range(self) -> tuple[int, int]:
        """The smallest and largest image side (height and width, px) the graph takes (`export.json`'s
        `shape_limits`; the export's own limits for the config's patch where it names none)."""
        limits = self.export_info.get("shape_limits") or {}
        sides = [limits.get(name) or side_limits(self.config)[name] for name in ("height", "width")]
        return max(int(low) for low, _ in sides), min(int(high) for _, high in sides)

    def _onnx_session(self, num_threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError as error:  # pragma: no cover - the export extra is missing
            raise ImportError(install_hint("running an ONNX refiner (onnxruntime)", "export")) from error
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        return ort.InferenceSession(str(self.graph_file), sess_options=options, providers=providers)

    # The inference helpers put models in eval mode and look for parameters; an exported graph has neither.
    def eval(self) -> "ExportedRefiner":
        return self

    def parameters(self):
        return iter(())

    def check_inputs(self, opt_v1: Any, month: Any = None, biome: Any = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The eager model's input checks (same exceptions and messages) -> (opt_v1, month, biome) tensors."""
        from .modeling_stage2 import Stage2RefinerModel

        # any numpy strides (a flipped or transposed view): torch.from_numpy takes no negative ones
        opt_v1 = torch.from_numpy(np.ascontiguousarray(opt_v1)) if isinstance(opt_v1, np.ndarray) else opt_v1
        Stage2RefinerModel._check_opt_v1(self._checker, opt_v1)
        batch = opt_v1.shape[0]
        month = Stage2RefinerModel._check_metadata(month, "month", 1, self.config.num_months, batch)
        biome = Stage2RefinerModel._check_metadata(biome, "biome", 0, self.config.num_biomes - 1, batch)
        limits = self.export_info.get("shape_limits") or side_limits(self.config)
        for axis, name, fix in ((0, "batch", "split the batch"), (2, "height", "pad the image"),
                                (3, "width", "pad the image")):
            low, high = limits.get(name, (None, None))
            size = opt_v1.shape[axis]
            if (low is not None and size < low) or (high is not None and size > high):
                raise ValueError(
                    f"opt_v1 {name} {size} is outside the exported graph's range {low}..{high} "
                    f"({self.graph_file.name}); {fix} or use the eager model."
                )
        return opt_v1, month, biome

    def __call__(self, opt_v1: Any, month: Any = None, biome: Any = None, output_hidden_states: bool | None = None,
                 return_dict: bool | None = None):
        from .modeling_stage2 import Stage2RefinerOutput

        if output_hidden_states:
            raise ValueError(f"an exported refiner returns {', '.join(self.output_names)} only (no hidden states)")
        opt_v1, month, biome = self.check_inputs(opt_v1, month, biome)
        output = Stage2RefinerOutput(**self._run(opt_v1, month, biome))
        return output.to_tuple() if return_dict is False else output

    forward = __call__

    def _run(self, opt_v1: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> dict[str, torch.Tensor]:
        """{output name: tensor} in `opt_v1`'s device and dtype."""
        input_device, input_dtype = opt_v1.device, opt_v1.dtype
        if self._program is not None:
            with torch.no_grad():
                outputs = self._program(
                    opt_v1.to(self.device, torch.float32), month.to(self.device), biome.to(self.device)
                )
            outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        else:
            feeds = {
                "opt_v1": np.ascontiguousarray(opt_v1.detach().cpu().float().numpy()),
                "month": np.ascontiguousarray(month.cpu().numpy().astype(np.int64)),
                "biome": np.ascontiguousarray(biome.cpu().numpy().astype(np.int64)),
            }
            outputs = [torch.from_numpy(array) for array in self._session.run(list(self.output_names), feeds)]
        return {name: tensor.to(input_device, input_dtype) for name, tensor in zip(self.output_names, outputs)}

    def __repr__(self) -> str:
        return f"ExportedRefiner({str(self.graph_file)!r}, format={self.format!r}, providers={self.providers})"


def load_exported(path: str | os.PathLike, *, device: str | torch.device | None = None, **kwargs) -> ExportedRefiner:
    """`ExportedRefiner(path, device=device, **kwargs)`."""
    return ExportedRefiner(path, device=device, **kwargs)
