"""``python -m attnres_quant plan CONFIG``: print the resolved precision plan of every variant.

One row per tensor or computation: component, layer, method, precision and granularity,
activation precision, and the rule that decided it; then a summary (average bits per
weight including scales, bytes of weights). Every variant is validated before any model
is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .methods import check_can_run
from .plan import resolve_plan
from .policy import parse_variant


def add_arguments(parser) -> None:
    parser.add_argument("config", help="study config (YAML) with `model`/`models` and `variants`")
    parser.add_argument("--variant", action="append", default=None,
                        help="only this variant (repeatable; default: all)")
    parser.add_argument("--model", default=None, help="only the model with this label or path")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="device the variants must be able to run on (default: the config's `device`; "
                             "auto = cuda when visible, else cpu); each method's can_run is checked against it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted), as for `run`")


def _read_config(path: str, overrides: list[str]) -> tuple[list[dict], list[dict], str, str]:
    """(models [{path, name?, ...}], raw variant dicts, dtype, device) from the study config."""
    try:
        from ..pipeline.config import load_config
    except ImportError:  # pipeline not built: minimal reader
        load_config = None
    if load_config is not None:
        cfg, _raw = load_config(path, overrides)
        models = [m.model_dump() for m in cfg.models]
        return models, list(cfg.variants), cfg.dtype, getattr(cfg, "device", "auto")
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path!r} does not exist", str(p.parent.resolve()),
                        "pass the path of a YAML study config")
    raw = yaml.safe_load(p.read_text()) or {}
    models = list(raw.get("models") or [])
    if raw.get("model"):
        models.insert(0, raw["model"])
    models = [{"path": m} if isinstance(m, str) else dict(m) for m in models]
    if not models:
        raise UserError("the config names no model", path, "add `model: {path: zoo:tiny-block}`")
    return models, list(raw.get("variants") or []), raw.get("dtype", "bfloat16"), raw.get("device", "auto")


def _label(m: dict) -> str:
    return m.get("name") or str(m["path"]).split(":", 1)[-1].rstrip("/").split("/")[-1]


def main(args) -> int:
    models, raw_variants, dtype, device = _read_config(args.config, args.overrides)
    device = getattr(args, "device", None) or device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not raw_variants:
        raise UserError("the config has no variants", args.config, "add a `variants:` list (SPEC section 3)")
    variants = [parse_variant(v, args.config) for v in raw_variants]  # all policy errors first
    if args.variant:
        unknown = set(args.variant) - {v.name for v in variants}
        if unknown:
            raise UserError(f"no variant named {', '.join(sorted(unknown))}", args.config,
                            "choose from " + ", ".join(v.name for v in variants))
        variants = [v for v in variants if v.name in args.variant]
    if args.model:
        models = [m for m in models if args.model in (_label(m), m["path"])] or models[:0]
        if not models:
            raise UserError(f"no model {args.model!r} in the config", args.config, "use a model label or path")
    from .. import loading

    out = []
    for spec in models:
        kw = dict(dtype=dtype, allow_pickle=bool(spec.get("allow_pickle", False)),
                  trust_remote_code=bool(spec.get("trust_remote_code", False)))
        if hasattr(loading, "structure_model"):  # module structure on the meta device: no weights read
            model = loading.structure_model(spec["path"], **kw)
        else:
            model, _tok = loading.load_model(spec["path"], **kw)
        for variant in variants:
            plan = resolve_plan(model, variant, args.config)
            check_can_run(plan, device, f"{args.config} (model {_label(spec)}), variant {variant.name!r}")
            if args.format == "json":
                out.append({"model": _label(spec), **plan.summary(), "notes": plan.notes,
                            "rows": [r.as_dict() for r in plan.rows]})
            else:
                print(f"== model {_label(spec)} ({spec['path']}), variant {variant.name} "
                      f"(method {variant.method}) ==")
                print(plan.to_table())
                print()
    if args.format == "json":
        print(json.dumps(out, indent=1))
    return 0
