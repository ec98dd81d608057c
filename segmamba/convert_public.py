"""Convert a checkpoint of the public SegMamba code (github.com/ge-xing/SegMamba) into a segmamba
checkpoint for segmamba.predict and segmamba.evaluate.

    python -m segmamba.convert_public PUBLIC.pt --out segmamba.pt [--roi 128] [--modalities ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .models.public_weights import PUBLIC_BRATS_MODALITIES, PublicWeightsError, convert_public_checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m segmamba.convert_public", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="state dict saved by the public code (e.g. final_model_0.9038.pt)")
    p.add_argument("--out", type=Path, required=True, help="segmamba checkpoint to write")
    p.add_argument("--roi", type=int, nargs="+", default=[128], help="sliding-window size, 1 or 3 ints (default 128)")
    p.add_argument("--modalities", nargs="+", default=list(PUBLIC_BRATS_MODALITIES),
                   help=f"input channels in the order the model was trained on "
                        f"(default {' '.join(PUBLIC_BRATS_MODALITIES)}, the public BraTS2023 order)")
    args = p.parse_args(argv)
    roi = args.roi * 3 if len(args.roi) == 1 else args.roi
    if len(roi) != 3 or min(roi) < 1:
        p.error(f"--roi: expected 1 or 3 positive ints, got {args.roi}")
    try:
        print(convert_public_checkpoint(args.src, args.out, tuple(roi), tuple(args.modalities)))
    except PublicWeightsError as e:
        p.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
