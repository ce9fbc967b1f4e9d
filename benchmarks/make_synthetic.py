"""Write a synthetic converted model of Qwen3.5-397B-A17B's shapes (random weights) for benchmarks.

Per layer: hidden 4096, 512 experts of intermediate 1024 (7,077,888 bytes each at 4 bits, 3.62 GB
a layer) + a shared expert of 1024, 32 q / 2 kv heads of 256, GatedDeltaNet 16 key / 64 value heads
of 128, 3 linear-attention layers to 1 full. All 60 layers take ~217 GB; --layers fits the disk at hand.

    python benchmarks/make_synthetic.py --out /data/synthetic --layers 12 --skew
    python benchmarks/make_synthetic.py --out /tmp/x --layers 4 --vocab 32768 --dry-run
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flash_moe.synthetic import QWEN35_SKEW, qwen35_397b_config, synthetic_bytes, write_synthetic  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder to write (a converted flash_moe model)")
    p.add_argument("--layers", type=int, default=60, help="decoder layers (60 in the real model)")
    p.add_argument("--vocab", type=int, default=248320, help="vocabulary size; smaller saves ~4 GB of resident weights")
    p.add_argument("--bits", type=int, default=4, help="expert bits: 2, 3, 4, 8, or 16 (unquantized)")
    p.add_argument("--group-size", type=int, default=64, help="expert quantization group size")
    p.add_argument("--resident-bits", type=int, default=None, help="quantize big resident matrices (4 or 8)")
    p.add_argument("--skew", type=float, nargs="?", const=QWEN35_SKEW, default=None,
                   help=f"router popularity skew; bare --skew gives Qwen3.5-397B's ({QWEN35_SKEW})")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="weights and scales (float32 for MLX's CPU: its quantized matmul is ~14x slower in bfloat16)")
    p.add_argument("--seed", type=int, default=0, help="every byte follows from it")
    p.add_argument("--dry-run", action="store_true", help="print the sizes and exit")
    args = p.parse_args(argv)

    config = qwen35_397b_config(args.layers, args.vocab)
    experts = synthetic_bytes(config, bits=args.bits, group_size=args.group_size, dtype=args.dtype)
    print(f"{args.layers} layers, vocab {args.vocab}: experts {experts / 1e9:.2f} GB "
          f"({experts / args.layers / 1e9:.2f} GB a layer), bits {args.bits}, skew {args.skew}")
    if args.dry_run:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.out).free
    if experts > free:
        sys.exit(f"{args.out}: {free / 1e9:.1f} GB free, the experts alone need {experts / 1e9:.1f} GB; use fewer --layers")
    start = time.perf_counter()
    write_synthetic(args.out, config, bits=args.bits, group_size=args.group_size, skew=args.skew, seed=args.seed,
                    resident_bits=args.resident_bits, dtype=args.dtype)
    seconds = time.perf_counter() - start
    total = folder_bytes(args.out)
    print(f"wrote {total / 1e9:.2f} GB to {args.out} in {seconds:.0f} s ({total / seconds / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()
