"""The ``vtr`` command: ``vtr methods``, ``vtr demo image``, ``vtr bench``."""
from __future__ import annotations

import argparse
import sys

DEFAULT_QUESTION = "What shapes are in the image?"


def _methods(args):
    import vtr

    for name, cls in vtr.methods().items():
        print(f"{name:<10} {cls.where:<9} {cls.summary}")


def _demo(args):
    from vtr import demo

    demo.run(model_id=args.model, image_path=args.image, question=args.question, method=args.method,
             retain=args.retain, budget=args.budget, max_new_tokens=args.max_new_tokens,
             attn_implementation=args.attn, overlay_path=args.overlay)


def _bench(args):
    from vtr.eval import bench

    result = bench.run(args.methods.split(","), [float(r) for r in args.retain.split(",")], repeats=args.repeats,
                       quick=args.quick, threads=args.threads, out=args.out)
    print(bench.format_table(result))
    if args.out:
        print(f"written to {args.out}")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"retain must be in (0, 1], got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vtr", description="training-free visual token reduction for VLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the registered methods").set_defaults(func=_methods)

    demo = sub.add_parser("demo", help="answer a question with and without token reduction")
    demo.add_argument("kind", choices=["image"], help="what to ask about")
    demo.add_argument("--model", help="Hugging Face id or path (default: the built-in offline model)")
    demo.add_argument("--image", help="image file (default: assets/shapes.png)")
    demo.add_argument("--question", default=DEFAULT_QUESTION)
    demo.add_argument("--method", default="fastv")
    demo.add_argument("--retain", type=_fraction)
    demo.add_argument("--budget", type=int)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager or flash_attention_2")
    demo.add_argument("--overlay", help="write the image with the kept patches highlighted to this PNG")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="prefill time vs ideal and analytic speedup, per method and retention")
    bench.add_argument("--methods", default="random,fastervlm,divprune,fastv,pdrop")
    bench.add_argument("--retain", default="0.25,0.1111111111111111")
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--threads", type=int)
    bench.add_argument("--quick", action="store_true", help="a smaller model, for a smoke run")
    bench.add_argument("--out", default="bench.json", help="JSON output path ('' for none)")
    bench.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"vtr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
