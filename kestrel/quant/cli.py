"""`kestrel quantize --method fp8|gptq|rtn [MODEL] OUT`: write a quantized Hugging Face folder
that the engine (and other engines reading the same formats) loads directly.

    fp8   Meta's fbgemm_fp8 layout with the Llama 3 recipe's choices (quant/fp8_checkpoint.py)
    gptq  GPTQ, calibrated on the pydoc text (quant/gptq_solver.py), 2/3/4/8 bits in groups,
          written in the format GPTQ checkpoints ship in (quant/gptq.py)
    rtn   the same format by round-to-nearest: the baseline of the GPTQ paper's tables
    smoothquant  W8A8 (int8 weights and per-token int8 activations) after SmoothQuant's
          smoothing, calibrated on the pydoc text, in the compressed-tensors layout
          (quant/smoothquant.py)
    sparse24  2:4 semi-structured sparsity by Wanda's score (or magnitude), a float folder
          that says so in config.json (quant/sparse.py)

MODEL: a Hugging Face folder or .gguf file; none: the default model.
"""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("quantize",
                       help="write a quantized or 2:4-sparse copy of a model folder (fp8, gptq, "
                       "rtn, smoothquant, sparse24)")
    p.add_argument("paths", nargs="+", metavar="[MODEL] OUT",
                   help="the model (a Hugging Face folder or .gguf; none: the default model) "
                        "and the output folder")
    p.add_argument("--method", required=True, choices=["fp8", "gptq", "rtn", "smoothquant", "sparse24"])
    p.add_argument("--fp8-activation-scale-ub", type=float, default=1200.0)
    p.add_argument("--fp8-attention", action="store_true",
                   help="fp8: quantize the attention projections too")
    p.add_argument("--no-fp8-skip-layers", dest="fp8_skip_layers", action="store_false",
                   help="fp8: quantize the first and last decoder layers too")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="gptq, rtn")
    p.add_argument("--group-size", type=int, default=128,
                   help="gptq, rtn: input features per scale (-1: one group per row)")
    p.add_argument("--sym", action="store_true",
                   help="gptq, rtn: symmetric grid (zero at 2^(b-1))")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="smoothquant: migration strength, the share of the activations' range "
                        "moved into the weights (0..1)")
    p.add_argument("--sparse-score", choices=["wanda", "magnitude"], default="wanda",
                   help="sparse24: which two of every four weights stay (wanda: |W|·‖X‖ over "
                        "calibration text; magnitude: |W|)")
    p.add_argument("--calib-windows", type=int, default=None,
                   help="gptq, smoothquant, sparse24: calibration windows from the end of the "
                        "pydoc text (default 128 for gptq, 64 for the others)")
    p.add_argument("--calib-window", type=int, default=512,
                   help="gptq, smoothquant, sparse24: tokens per window")
    p.add_argument("--device", default="cpu", help="fp8: where weights are quantized")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from kestrel.engine.args import resolve_model

    if len(args.paths) > 2:
        raise SystemExit("kestrel quantize: give [MODEL] OUT")
    model, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    src, _ = resolve_model(model, "auto")
    if args.method == "fp8":
        from kestrel.quant.fp8_checkpoint import quantize_folder

        folder = quantize_folder(src, out, activation_scale_ub=args.fp8_activation_scale_ub,
                                 fp8_attention=args.fp8_attention,
                                 fp8_skip_layers=args.fp8_skip_layers, device=args.device)
    elif args.method == "gptq":
        from kestrel.quant.gptq_solver import write_gptq_folder

        folder = write_gptq_folder(src, out, bits=args.bits, group_size=args.group_size,
                                   sym=args.sym, windows=args.calib_windows or 128,
                                   window=args.calib_window)
    elif args.method == "smoothquant":
        from kestrel.quant.smoothquant import write_smoothquant_folder

        folder = write_smoothquant_folder(src, out, alpha=args.alpha,
                                          windows=args.calib_windows or 64,
                                          window=args.calib_window)
    elif args.method == "sparse24":
        from kestrel.quant.sparse import write_sparse_folder

        folder = write_sparse_folder(src, out, score=args.sparse_score,
                                     windows=args.calib_windows or 64, window=args.calib_window)
    else:
        from kestrel.quant.gptq import write_rtn_folder

        folder = write_rtn_folder(src, out, bits=args.bits, group_size=args.group_size,
                                  sym=args.sym)
    print(f"wrote {folder} ({args.method}); serve it with: kestrel serve --model {folder}")
    return 0
