"""One process of the multi-process test: joins the run, loads the checkpoint into each global mesh, runs the
forward on the saved prompt, and (process 0) writes the gathered logits.

  python multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID CHECKPOINT PROMPT_NPZ OUT_DIR ICI [ICI ...]

ICI is a mesh shape such as 2,2,2. Every process writes OUT_DIR/info{PROCESS_ID}.json (device counts);
process 0 writes OUT_DIR/logits_{ICI}.npy and an HF export OUT_DIR/export_{ICI}/ per mesh.
"""

import json
import os
import sys

from zoomer_jax.parallel import distributed


def main(argv):
  coordinator, n, pid, checkpoint, prompt_path, out_dir, *meshes = argv
  distributed.initialize(coordinator, int(n), int(pid))

  import jax
  import numpy as np

  import zoomer_jax
  from zoomer_jax.parallel.mesh import make_mesh

  info = dict(process_index=jax.process_index(), process_count=jax.process_count(),
              device_count=jax.device_count(), local_device_count=jax.local_device_count(), meshes={})
  prompt = dict(np.load(prompt_path))
  for ici in meshes:
    mesh = make_mesh(tuple(int(d) for d in ici.split(",")))
    model = zoomer_jax.load_hf(checkpoint, mesh=mesh)
    with jax.set_mesh(mesh):
      logits = model(**prompt)
    info["meshes"][ici] = dict(multi_process=mesh.is_multi_process,
                               logits_fully_addressable=logits.is_fully_addressable)
    logits = distributed.to_host(logits)
    if distributed.is_main_process():
      np.save(os.path.join(out_dir, f"logits_{ici}.npy"), logits)
    # Every process takes part in gathering the parameters; only process 0 writes files.
    zoomer_jax.export_hf(model, os.path.join(out_dir, f"export_{ici}"), max_shard_bytes=300_000)
  with open(os.path.join(out_dir, f"info{pid}.json"), "w") as f:
    json.dump(info, f)


if __name__ == "__main__":
  main(sys.argv[1:])
