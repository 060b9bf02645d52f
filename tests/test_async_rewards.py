import threading

from tests.test_trainer import make_trainer

CALLS = []


def recording_colour(prompts, completions, **kwargs):
    """prompt_color, recording which thread scored how many images."""
    from reward_funcs.rules import prompt_color

    CALLS.append((threading.current_thread().name, len(completions)))
    return prompt_color(prompts, completions)


def test_async_rewards_score_chunks_in_a_worker_and_equal_the_synchronous_path(tiny_sd3_path, tmp_path):
    results = {}
    for async_rewards in (False, True):
        CALLS.clear()
        trainer = make_trainer(
            tiny_sd3_path,
            tmp_path / str(async_rewards),
            reward_funcs=[recording_colour],
            rollout_batch_size=4,
            async_rewards=async_rewards,
        )
        trainer.model.train()
        inputs = [dict(trainer.train_dataset[i // 8]) for i in range(16)]
        batch = trainer._generate_and_score_completions(inputs)
        results[async_rewards] = (batch["advantages"], list(CALLS))
    sync_advantages, sync_calls = results[False]
    async_advantages, async_calls = results[True]
    assert sync_advantages.abs().sum() > 0
    assert sync_advantages.tolist() == async_advantages.tolist()
    assert sync_calls == [("MainThread", 16)]
    assert [n for _, n in async_calls] == [4, 4, 4, 4]
    assert all(name != "MainThread" for name, _ in async_calls)
