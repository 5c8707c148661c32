"""How far the exported ONNX graphs are from the fake-quant model on real testbed images (issue 16): per image,
the encoder embedding's relative L2 error, and the mask agreement of the chained ONNX graphs (encoder -> decoder)
against the fake-quant model at low and full resolution, GT-box prompts.

    python tools/onnx_agreement.py RUN_DIR [--images 40] [--data data/testbed-seed0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from carsam.data.coco import CocoBoxPrompts
from carsam.export.onnx_graph import DecoderGraph, EncoderGraph, export_onnx
from carsam.export.saved import load_quantized


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--data", default="data/testbed-seed0", help="a synthetic dataset folder")
    parser.add_argument("--verbose", action="store_true", help="also print each image's encoder error")
    args = parser.parse_args()
    sam = load_quantized(args.run_dir)
    folder = Path(tempfile.mkdtemp())
    export_onnx(sam, folder)
    encoder = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(folder / "decoder.onnx"), providers=["CPUExecutionProvider"])
    root = Path(args.data)
    val = CocoBoxPrompts(root / "images" / "val", root / "instances_val.json", None, prompt_source="gt_boxes")
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    errors, counts = [], np.zeros(4)  # low-res agree, low-res total, full-res agree, full-res total
    for image_id in val.image_ids[: args.images]:
        image, boxes = val.load_image(image_id), val.prompts(image_id)[0]
        if not len(boxes):
            continue
        resized = transform.apply_image(image)
        pixels = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float())
        scaled = torch.as_tensor(transform.apply_boxes(boxes.astype(np.float64), image.shape[:2]), dtype=torch.float32)
        with torch.no_grad():
            embedding = EncoderGraph(sam)(pixels)
            masks, _ = DecoderGraph(sam)(embedding, scaled)
        embedding_ort = encoder.run(None, {"image": pixels.numpy()})[0]
        masks_ort = torch.from_numpy(decoder.run(None, {"image_embeddings": embedding_ort, "boxes": scaled.numpy()})[0])
        errors.append(float(np.linalg.norm(embedding_ort - embedding.numpy()) / np.linalg.norm(embedding.numpy())))
        full = sam.postprocess_masks(masks, resized.shape[:2], image.shape[:2]) > 0
        full_ort = sam.postprocess_masks(masks_ort, resized.shape[:2], image.shape[:2]) > 0
        counts += [int(((masks_ort > 0) == (masks > 0)).sum()), masks.numel(), int((full == full_ort).sum()),
                   full.numel()]
    if args.verbose:
        print("per-image encoder relative L2:", " ".join(f"{e:.2g}" for e in errors))
    print(f"images {len(errors)}: encoder relative L2 median {np.median(errors):.2g}, max {max(errors):.2g}, "
          f"{sum(e > 1e-5 for e in errors)} above 1e-5; masks agree {100 * counts[0] / counts[1]:.3f}% (low-res), "
          f"{100 * counts[2] / counts[3]:.3f}% (full-res)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
