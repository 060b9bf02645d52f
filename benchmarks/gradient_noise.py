"""How much of a Flow-GRPO gradient is signal: the cosine between the gradients of independent rollout batches.

Several rollout batches of the *same* prompts (new noise each time) are drawn with the mini model, and the loss
gradient of each is taken at the same weights. A noise-free estimator gives cosine 1 between any two of them, pure
noise 0; for an unbiased estimator at small cosines, the cosine grows about linearly with the images per batch, so
the ratio of two settings' cosines is how many times more images the worse one needs. Used to measure
``antithetic_sampling`` and to explain why the mini-GenEval reward barely rises (docs/mini_geneval.md).

Run: python -m benchmarks.gradient_noise [--reward mini|brightness] [--prompts 16] [--group 8] [--batches 6]
(one line per setting: mean cosine over all pairs of batches and its standard error; ~2 min per setting on 2 cores)
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile

import numpy as np
import torch


def gradient_cosines(antithetic: bool, reward: str, prompts: int, group: int, batches: int) -> list[float]:
    """Cosines between the LoRA gradients of ``batches`` rollout batches of the same ``prompts`` x ``group`` images
    (window [0, 2): the first two denoising steps, where the layout is decided)."""
    from trl_flow.data import load_prompt_dataset
    from trl_flow.mini.data import PROMPTS_DIR
    from trl_flow.mini.grpo import make_mini_trainer

    train = load_prompt_dataset(str(PROMPTS_DIR), "train")
    dataset = train.select(list(range(0, len(train), max(len(train) // prompts, 1)))[:prompts])
    reward_funcs = {} if reward == "mini" else {"reward_funcs": [reward]}
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_mini_trainer(
            output_dir,
            train_dataset=dataset,
            antithetic_sampling=antithetic,
            num_generations=group,
            per_device_train_batch_size=len(dataset) * group,
            steps_per_generation=1,
            sde_window_range=[0, 1],
            **reward_funcs,
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = [dict(dataset[i // group]) for i in range(len(dataset) * group)]
        gradients = []
        for batch_index in range(batches):
            trainer.state.global_step = batch_index  # a new rollout seed, the same weights
            batch = trainer._generate_and_score_completions(inputs)
            trainer.model.zero_grad(set_to_none=True)
            trainer.compute_loss(trainer.model, batch).backward()
            parameters = [p for p in trainer.model.parameters() if p.grad is not None]
            gradients.append(torch.cat([p.grad.flatten() for p in parameters]))
    return [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in itertools.combinations(gradients, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", default="mini", help="'mini' (the recipe's rewards) or a built-in reward name")
    parser.add_argument("--prompts", type=int, default=16, help="train prompts per batch (spread over the split)")
    parser.add_argument("--group", type=int, default=8, help="images per prompt")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    for antithetic in (False, True):
        cosines = gradient_cosines(antithetic, args.reward, args.prompts, args.group, args.batches)
        print(
            f"reward {args.reward}, {args.prompts * args.group} images per batch, antithetic_sampling {antithetic}: "
            f"gradient cosine {np.mean(cosines):+.4f} +- {np.std(cosines) / np.sqrt(len(cosines)):.4f} "
            f"({len(cosines)} pairs of {args.batches} batches)",
            flush=True,
        )


if __name__ == "__main__":
    main()
