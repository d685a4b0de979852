"""The ``vtr`` command: ``vtr methods``, ``vtr demo image|video``, ``vtr eval``, ``vtr bench``."""
from __future__ import annotations

import argparse
import sys

DEFAULT_QUESTION = "What shapes are in the image?"
BENCH_METHODS = "random,fastervlm,divprune,fastv,pdrop"


def _methods(args):
    import vtr

    for name, cls in vtr.methods().items():
        print(f"{name:<12} {cls.where:<14} {cls.summary}")


def _demo(args):
    from vtr import demo

    common = dict(model_id=args.model, question=args.question, retain=args.retain, budget=args.budget,
                  max_new_tokens=args.max_new_tokens, attn_implementation=args.attn, overlay_path=args.overlay)
    if args.kind == "video":
        demo.run_video(video_path=args.video, method=args.method or "fastvid", num_frames=args.frames, **common)
    else:
        demo.run(image_path=args.image, method=args.method or "fastv", **common)


def _bench(args):
    from vtr.eval import bench, bench_encoder, bench_kernels, bench_video

    if args.kernels:
        module = bench_kernels
        result = bench_kernels.run(repeats=args.repeats, quick=args.quick, device=args.device,
                                   out=args.out if args.out != "bench.json" else "bench_kernels.json")
    elif args.video:
        module = bench_video
        methods = args.methods if args.methods != BENCH_METHODS else "framesample,dycoke,fastvid,holitom,random,fastv"
        result = bench_video.run(methods.split(","), [float(r) for r in args.retain.split(",")],
                                 repeats=args.repeats, quick=args.quick, threads=args.threads,
                                 out=args.out if args.out != "bench.json" else "bench_video.json",
                                 device=args.device, size=args.size, attn=args.attn)
    elif args.encoder:
        module = bench_encoder
        result = bench_encoder.run(args.encoder, repeats=args.repeats, quick=args.quick, threads=args.threads,
                                   out=args.out)
    else:
        module = bench
        result = bench.run(args.methods.split(","), [float(r) for r in args.retain.split(",")], repeats=args.repeats,
                           quick=args.quick, threads=args.threads, out=args.out, device=args.device,
                           arch=args.arch, size=args.size, attn=args.attn)
    print(module.format_table(result))
    if args.out:
        print(f"written to {args.out}")
    if args.plot and module is bench:
        bench.plot(result, args.plot)
        print(f"plot written to {args.plot}")


def _eval(args):
    from importlib import resources

    import vtr
    from vtr.builtin import load_model
    from vtr.eval import evaluate
    from vtr.eval.data import load_examples

    methods = [m for m in args.methods.split(",") if m]
    retains = [_fraction(r) for r in args.retain.split(",")]
    for method in methods:                                   # fail before loading data or the model
        vtr.api.resolve(method, retains[0], None)
    data = args.data or str(resources.files("vtr.assets").joinpath("shapes-test", "test.jsonl"))
    examples = load_examples(data, on_error=args.on_error)
    skipped = examples.skipped
    if skipped:
        print(f"vtr: skipped {skipped} bad line(s) of {data}", file=sys.stderr)
    examples = examples[:args.limit] if args.limit else examples
    model, processor = load_model(args.model, args.attn)
    if args.stability:
        from vtr.eval import stability

        results = stability.stability(model, processor, examples, methods, [r for r in retains if r < 1] or retains,
                                      batch_size=args.batch_size, suffix=args.suffix, show_progress=not args.quiet)
        print(stability.format_table(results))
        evaluate.write(results, args.out, model=args.model or "built-in tiny-llava", data=data,
                       examples=len(examples), skipped=skipped, perturbations=list(stability.PERTURBATIONS))
        print(f"written to {args.out}")
        return
    results = evaluate.evaluate(model, processor, examples, methods, retains, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, suffix=args.suffix, show_progress=not args.quiet,
                                ablation=args.ablation, num_frames=args.frames)
    print(evaluate.format_table(results))
    evaluate.write(results, args.out, model=args.model or "built-in tiny-llava", data=data, examples=len(examples),
                   skipped=skipped, device=str(model.device), attn_implementation=args.attn)
    print(f"written to {args.out}")
    if args.plot:
        evaluate.plot(results, args.plot, title=f"{args.model or 'built-in tiny-llava'} on {len(examples)} examples")
        print(f"plot written to {args.plot}")


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
    demo.add_argument("kind", choices=["image", "video"], help="what to ask about")
    demo.add_argument("--model", help="Hugging Face id or path, or tiny-llava / tiny-qwen2-vl (shipped; default: "
                      "the built-in offline model)")
    demo.add_argument("--image", help="image file (default: an example of the shipped shapes test split)")
    demo.add_argument("--video", help="video file or directory of frames (default: the shipped clip)")
    demo.add_argument("--frames", type=int, help="frames sampled from the video (default: 8 built-in, 16 otherwise)")
    demo.add_argument("--question", help="default: the example's question, or %r with --image" % DEFAULT_QUESTION)
    demo.add_argument("--method", help="default: fastv (image), fastvid (video)")
    demo.add_argument("--retain", type=_fraction)
    demo.add_argument("--budget", type=int)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager or flash_attention_2")
    demo.add_argument("--overlay", help="write the image (a video: a strip of its frames) with the kept tokens "
                      "highlighted to this PNG")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("eval", help="accuracy, retention, FLOPs, latency and KV cache per method and retention")
    ev.add_argument("--model", help="Hugging Face id or path, or tiny-llava / tiny-qwen2-vl (the shipped tiny trained "
                    "models; default: tiny-llava)")
    ev.add_argument("--data", help="JSONL of image or video, question, answer (default: the shipped shapes test split; "
                    "the video split is assets/clips-test/test.jsonl)")
    ev.add_argument("--methods", default="random,fastervlm,divprune,fastv,pdrop")
    ev.add_argument("--retain", default="1,0.5,0.25,0.11")
    ev.add_argument("--limit", type=int, help="use only the first N examples")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=4)
    ev.add_argument("--frames", type=int, default=16, help="frames sampled uniformly from each video row's video")
    ev.add_argument("--suffix", default="", help="appended to every question, e.g. ' Answer with one word.'")
    ev.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="a bad data line is fatal, or "
                    "skipped with a warning naming its file and line")
    ev.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager or flash_attention_2")
    ev.add_argument("--out", default="eval.json")
    ev.add_argument("--plot", default="eval.png", help="PNG of accuracy vs retention ('' for none)")
    ev.add_argument("--ablation", action="store_true", help="also run the control with every image's visual tokens "
                    "replaced by their mean (does the model read the image?)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--stability", action="store_true", help="instead: how much each method's kept set changes "
                    "(Jaccard) under pixel noise, a JPEG round trip and a 1-px shift")
    ev.set_defaults(func=_eval)

    bench = sub.add_parser("bench", help="prefill time vs ideal and analytic speedup, per method and retention")
    bench.add_argument("--methods", default=BENCH_METHODS, help="default: %(default)s; with --video: framesample,"
                       "dycoke,fastvid,holitom,random,fastv")
    bench.add_argument("--retain", default="0.25,0.1111111111111111")
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--threads", type=int)
    bench.add_argument("--quick", action="store_true", help="a smaller model, for a smoke run")
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:N] (image and video bench; default: "
                       "%(default)s)")
    bench.add_argument("--arch", choices=["llava", "llava-next", "qwen2.5-vl"], default="llava",
                       help="image bench model: LLaVA-1.5 (576 visual tokens), LLaVA-NeXT (a 672 px image: 2,928) or "
                            "Qwen2.5-VL (an 896 x 672 image: 768); default: %(default)s")
    bench.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
                       help="the image bench model's attention implementation (flash_attention_2: flash-attn on a "
                            "GPU); default: %(default)s")
    bench.add_argument("--size", choices=["cpu", "quick", "7b", "cpu-wide"],
                       help="the 7B's depths at widths / 8 in float32 (cpu; with --video, on 8 frames), a smoke-run "
                            "model (quick), the full 7B in bfloat16 (7b; with --video, LLaVA-OneVision-7B on 32 "
                            "frames) or LLaVA at widths / 4 (cpu-wide); default: 7b on CUDA, cpu elsewhere")
    bench.add_argument("--out", default="bench.json", help="JSON output path ('' for none)")
    bench.add_argument("--plot", default="", help="PNG: measured, ideal and analytic prefill speedup per method and "
                       "retention (LLaVA-1.5 bench)")
    bench.add_argument("--encoder", choices=["timm", "open_clip"],
                       help="instead: images/s of an encoder-only ViT under tome and evit")
    bench.add_argument("--video", action="store_true", help="instead: a video on a LLaVA-OneVision-shaped model "
                       "(output bench_video.json)")
    bench.add_argument("--kernels", action="store_true", help="instead: the sequential selection kernels alone "
                       "(Triton, PyTorch and host loops) and recomputed attention rows at 576, 2,880 and 8,192 tokens "
                       "(output bench_kernels.json)")
    bench.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, argparse.ArgumentTypeError) as err:
        print(f"vtr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
