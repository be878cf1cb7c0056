"""Ray Data curation: raw image, audio and 3D collections → bucketed WebDataset shards + manifest (`python -m jobs.prepare`).

Read in pipeline order (the stages `plan.build_plan` runs): sources (list the inputs) → decode → filters (rules) →
caption → scores → filters (dedup) → buckets → encode (VAE latents or tensors, then text features) → writer.
`stage.py` is what every stage is built on (Stage, Reject, row/batch conversion, StageChain) and `ledger.py` the run's
counts and rejects; `plan.py` wires them together, `shards.py` reads the result back (the trainer's side of the
contract in `constants.py`).
"""
