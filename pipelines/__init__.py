"""Ray Data curation: raw image, audio and 3D collections → bucketed WebDataset shards + manifest (`python -m jobs.prepare`).

Read in pipeline order: sources → decode → caption → filters → buckets → encode → writer; `plan.py` wires them together,
`shards.py` reads the result back (the trainer's side of the contract in `constants.py`).
"""
