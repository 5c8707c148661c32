"""On-disk stage caches shared by the runs, trials and workers of a study: `store` (the entry-store base:
paths, weights-only reads, atomic writes, counts, canonical keys), `embeddings` (FP image embeddings),
`prepared` (PTQ4SAM's prepared quantized model and the reconstructed image-encoder units).
"""
