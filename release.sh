#!/usr/bin/env bash
# Makes the release, checkpoints/hybrid-vit-cifar10, from scratch:
#   1. trains configs/release.yaml: the default design and recipe, a fixed seed and length;
#   2. evaluates it on the validation split its run held out, into its card: accuracy with and
#      without flip TTA, calibration before and after a temperature fitted there (saved in
#      config.json), the transformer's health and the faithfulness of its maps;
#   3. puts it in place of checkpoints/hybrid-vit-cifar10, without its training state. The old
#      release is replaced only once all of that has worked.
#
#   ./release.sh                                        # on the Hub's uoft-cs/cifar10
#   ./release.sh --dataset_name ../shared/data/cifar10  # or a local copy
#   ./release.sh --resume_from_checkpoint latest        # after any interruption, SIGKILL included
#
# Its arguments go to run_train.py (--help lists them); --dataset_name and --output_dir also
# to the evaluation. Paths are relative to the project folder. RELEASE_DIR=folder puts the
# result somewhere else.
set -euo pipefail
cd "$(dirname "$0")"  # the project folder: relative paths in the arguments start here

for arg in "$@"; do
    if [[ $arg == -h || $arg == --help ]]; then
        sed -n '2,/^set -euo/p' "$(basename "$0")" | sed '$d' | sed -E 's/^# ?//'
        exec python run_train.py --config configs/release.yaml --help
    fi
done

dataset=uoft-cs/cifar10
model=outputs/release/hybrid-vit-cifar10  # configs/release.yaml's output_dir
release=${RELEASE_DIR:-checkpoints/hybrid-vit-cifar10}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --dataset_name) dataset=${args[i + 1]:-} ;;
        --dataset_name=*) dataset=${args[i]#*=} ;;
        --output_dir) model=${args[i + 1]:-} ;;
        --output_dir=*) model=${args[i]#*=} ;;
    esac
done

accelerate launch run_train.py --config configs/release.yaml "$@"
python run_eval.py --model "$model" --dataset_name "$dataset" --split validation --tta --save_temperature --add_to_card \
    --output_dir "$model-evaluation"

staging="$release.incomplete"
rm -rf "$staging"
mkdir -p "$staging"
find "$model" -maxdepth 1 -type f -exec cp {} "$staging/" \;  # the Hub folder; its checkpoints/ stay behind
rm -rf "$release"
mv "$staging" "$release"
echo "release.sh: the release is in $release; its evaluation's figures are in $model-evaluation" >&2
