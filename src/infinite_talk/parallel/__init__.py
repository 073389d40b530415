"""Several processes for one job (issue 10): `torchrun --nproc-per-node N -m infinite_talk.cli generate ...`.

launch.py    the launcher's world (RANK / WORLD_SIZE / LOCAL_RANK), the process group (NCCL or gloo), SIGTERM
sequence.py  sequence parallelism of the transformer on diffusers' context-parallel attention (Ulysses / ring)
peers.py     rank 0 runs the pipeline and sends every transformer call; the other processes run the same forward
             (their process entry is ../follower.py, above the planner and loading it uses)
"""
