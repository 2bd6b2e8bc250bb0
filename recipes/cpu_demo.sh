#!/usr/bin/env bash
# The whole K2 recipe at toy scale on a CPU (~12 minutes on 2 cores): pre-train with MuonClip on the embedded
# corpus, SFT on the built-in tool world (scored before/after), then serve the result to any OpenAI client.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
OPENK2=.venv/bin/openk2
$OPENK2 pretrain --out runs/pretrain                      # ~5 min: metrics.jsonl, plots/, checkpoints/
$OPENK2 sample runs/pretrain --prompt "ROMEO:" --max-tokens 40
$OPENK2 sft --base runs/pretrain --out runs/sft           # ~6 min: runs/sft/tool_eval.json
$OPENK2 plot runs/pretrain runs/sft --out runs/plots      # overlay both stages
echo "serve it:  $OPENK2 serve runs/sft --port 8000   (base_url http://127.0.0.1:8000/v1)"
