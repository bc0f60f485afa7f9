"""Checkpoints: tahoe-ft's own files and upstream `state tx train` compatibility.

Owns `io` (atomic save, weights-only load, `init_from` with its report; `read_weights` -> `CheckpointWeights`,
`load_checkpoint` -> `LoadedCheckpoint`: the model and what its file records), `upstream_hparams` (upstream
`hyper_parameters` <-> tahoe-ft hparams), `upstream_folder` (`state tx train` run folders in),
`upstream_export` (run folders out, `export-state`) and `safe_pickle` (the restricted unpickler those folders'
files are read with). Imports run one way: `upstream_export` -> `io` -> `upstream_folder` -> `safe_pickle`.
Nothing here trains or predicts.
"""
