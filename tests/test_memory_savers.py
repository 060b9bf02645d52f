import torch

import trl_flow.offload as offload_module
from tests.test_trainer import make_trainer


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_sd3_path, tmp_path):
    results = {}
    for checkpointing in (False, True):
        trainer = make_trainer(tiny_sd3_path, tmp_path / str(checkpointing))
        if checkpointing:
            trainer.model.activation_checkpointing_enable()  # what Trainer.train() calls for gradient_checkpointing
        assert trainer.model.is_gradient_checkpointing == checkpointing
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = [dict(trainer.train_dataset[i // 8]) for i in range(16)]
        batch = trainer._generate_and_score_completions(inputs)
        # Move the LoRA off zero so that its gradients depend on the whole network.
        with torch.no_grad():
            for name, parameter in trainer.model.named_parameters():
                if "lora_B" in name:
                    parameter.fill_(0.01)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[checkpointing] = (loss.detach(), grads)
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results[False], results[True]
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_plain.keys() == grads_ckpt.keys() and grads_plain
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_key_reaches_the_denoiser(tiny_sd3_path, tmp_path):
    trainer = make_trainer(tiny_sd3_path, tmp_path, gradient_checkpointing=True, max_steps=1)
    trainer.train()
    assert trainer.pipeline.transformer.gradient_checkpointing


def _loss_grads_and_metrics(trainer, batch):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def test_micro_batched_training_passes_give_the_same_loss_gradients_and_metrics(tiny_sd3_path, tmp_path):
    # beta > 0 so the reference pass and the KL are split too; micro-batches of 3 do not divide 8 (uneven parts).
    trainer = make_trainer(tiny_sd3_path, tmp_path, beta=0.1)
    trainer.model.train()
    inputs = [dict(trainer.train_dataset[i // 8]) for i in range(8)]
    batch = trainer._generate_and_score_completions(inputs)
    with torch.no_grad():  # LoRA off zero, and a policy that is not the rollout's: ratios and KL are not trivial
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)

    loss_whole, grads_whole, metrics_whole = _loss_grads_and_metrics(trainer, batch)
    for micro_batch_size in (3, 1):
        trainer.args.train_micro_batch_size = micro_batch_size
        loss, grads, metrics = _loss_grads_and_metrics(trainer, batch)
        torch.testing.assert_close(loss, loss_whole)
        assert grads.keys() == grads_whole.keys() and grads
        for name in grads:
            torch.testing.assert_close(grads[name], grads_whole[name], rtol=1e-4, atol=1e-7)
        assert metrics.keys() == metrics_whole.keys()
        for key in metrics:
            assert abs(metrics[key] - metrics_whole[key]) <= 1e-5 * max(1.0, abs(metrics_whole[key])), key
    assert metrics_whole["kl"] > 0 and metrics_whole["ratio/max_abs_deviation"] > 0


class _DeviceLog:
    """Records where each frozen module was sent, and where the encoders / VAE were when they were used."""

    def __init__(self, trainer, monkeypatch):
        self.moves, self.used_on = [], []
        for name, module in trainer.adapter.frozen_modules().items():
            original = module.to

            def to(*args, _name=name, _original=original, **kwargs):
                self.moves.append((_name, str(args[0] if args else kwargs.get("device"))))
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, "to", to)
        encode, decode = trainer.adapter.encode_prompts, trainer.adapter.decode_latents

        def where(prefix):
            return [name for name, _ in self.moves if name.startswith(prefix)]

        def logged_encode(*args, **kwargs):
            self.used_on.append(("encode", len(where("text_encoder"))))
            return encode(*args, **kwargs)

        def logged_decode(*args, **kwargs):
            self.used_on.append(("decode", len(where("vae"))))
            return decode(*args, **kwargs)

        monkeypatch.setattr(trainer.adapter, "encode_prompts", logged_encode)
        monkeypatch.setattr(trainer.adapter, "decode_latents", logged_decode)


def test_offloaded_encoders_and_vae_visit_the_device_only_while_used_and_change_nothing(
    tiny_sd3_path, tmp_path, monkeypatch
):
    # On this CPU-only machine the accelerator is "cpu": park offloaded modules on "cpu:0" (the same memory, another
    # name) so that moves in and out can be told apart.
    monkeypatch.setattr(offload_module, "OFFLOAD_DEVICE", torch.device("cpu", 0))
    inputs = None
    results = {}
    for offload in (False, True):
        trainer = make_trainer(
            tiny_sd3_path, tmp_path / str(offload), offload_text_encoders=offload, offload_vae=offload
        )
        log = _DeviceLog(trainer, monkeypatch)
        trainer.model.train()
        inputs = inputs or [dict(trainer.train_dataset[i // 8]) for i in range(16)]
        batch = trainer._generate_and_score_completions(inputs)
        results[offload] = (batch, trainer.sample_images(), log)

    (plain_batch, plain_images, plain_log), (batch, images, log) = results[False], results[True]
    assert not plain_log.moves  # without offload nothing is moved around
    text_encoders = [name for name in log_names(log) if name.startswith("text_encoder")]
    assert sorted(set(text_encoders)) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    for name in set(log_names(log)):
        assert [where for moved, where in log.moves if moved == name] == ["cpu", "cpu:0"], name
    # Each use happened after the module's move in and before its move out.
    # Decoding goes one training micro-batch at a time (RolloutSampler.decode), all while the VAE is in.
    decodes = -(-len(inputs) // trainer.args.per_device_train_batch_size)
    assert decodes > 1 and [kind for kind, _ in log.used_on] == ["encode"] + ["decode"] * decodes
    assert log.used_on == [("encode", 3)] + [("decode", 1)] * decodes
    for key in plain_batch:
        torch.testing.assert_close(batch[key], plain_batch[key])
    assert [image.tobytes() for image in images] == [image.tobytes() for image in plain_images]


def log_names(log):
    return [name for name, _ in log.moves]


def test_the_default_training_pass_backpropagates_each_trained_step_with_the_single_pass_results(
    tiny_sd3_path, tmp_path, monkeypatch
):
    # The trainer's default (train_micro_batch_size unset) backpropagates one trained step at a time; the loss,
    # gradients and metrics must be those of one backward over all steps (the path the Algorithm still offers).
    trainer = make_trainer(tiny_sd3_path, tmp_path, beta=0.1)
    assert trainer.args.train_micro_batch_size is None
    trainer.model.train()
    batch = trainer._generate_and_score_completions([dict(trainer.train_dataset[i // 4]) for i in range(8)])
    with torch.no_grad():  # LoRA off zero, off-policy: ratios, clipping and KL are not trivial
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    num_terms = trainer.algorithm.num_terms(batch)
    assert num_terms > 1

    trainer.model.zero_grad()
    loss_single, metrics_single = trainer.algorithm.loss(
        trainer.model, batch, trainer._reference_denoiser, trainer.accelerator, 1, backward_per_term=False
    )
    loss_single.backward()
    grads_single = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    backward_calls = []
    backward = trainer.accelerator.backward
    monkeypatch.setattr(trainer.accelerator, "backward", lambda loss: (backward_calls.append(1), backward(loss)))
    loss, grads, metrics = _loss_grads_and_metrics(trainer, batch)
    assert len(backward_calls) == num_terms - 1  # every step but the last; the Trainer backpropagates that one
    torch.testing.assert_close(loss, loss_single.detach())
    assert grads.keys() == grads_single.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_single[name], rtol=1e-4, atol=1e-7)
    assert metrics.keys() == metrics_single.keys()
    for key in metrics:
        assert abs(metrics[key] - metrics_single[key]) <= 1e-5 * max(1.0, abs(metrics_single[key])), key
    assert metrics_single["kl"] > 0 and metrics_single["ratio/max_abs_deviation"] > 0


def test_rollout_decodes_in_training_micro_batches_without_changing_an_image(tiny_sd3_path, tmp_path):
    trainer = make_trainer(tiny_sd3_path, tmp_path, per_device_train_batch_size=3, num_generations=3)
    latents = torch.randn(7, *trainer.adapter.prepare_latents(1, 32, 32, torch.Generator().manual_seed(0)).shape[1:])
    decoded = []
    decode = trainer.adapter.decode_latents
    trainer.adapter.decode_latents = lambda part: (decoded.append(part.shape[0]), decode(part))[1]
    sliced = trainer.rollouts.decode(latents)
    assert decoded == [3, 3, 1]
    whole = decode(latents)
    assert [image.tobytes() for image in sliced] == [image.tobytes() for image in whole]


def test_rollout_runs_the_denoiser_in_training_micro_batches_with_the_whole_batch_s_results(tiny_sd3_path, tmp_path):
    # 8 images with CFG 4, micro-batches of 3: the transformer sees 6, 6 and 4 samples (CFG doubles each slice)
    # instead of 16 at once; every random draw still covers the batch, so latents and log-probs are the whole
    # batch's (float32 round-off of a smaller matrix product aside).
    trainer = make_trainer(
        tiny_sd3_path, tmp_path, per_device_train_batch_size=3, num_generations=3, guidance_scale=4.0
    )
    forward_sizes = []
    hook = trainer.adapter.pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: forward_sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    prompts = ["a red image"] * 4 + ["a blue image"] * 4

    def rollout():
        return trainer.rollouts.rollout(trainer._denoiser_for_generation, prompts, 4, 0.7, range(3), seed=3)

    try:
        sliced_images, sliced, _ = rollout()
        sliced_sizes, forward_sizes[:] = list(forward_sizes), []
        trainer.args.per_device_train_batch_size = 8
        whole_images, whole, _ = rollout()
    finally:
        hook.remove()
    assert sliced_sizes == [6, 6, 4] * 4 and forward_sizes == [16] * 4
    assert sliced.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(sliced[name], whole[name], rtol=1e-5, atol=1e-5)
    assert len(sliced_images) == len(whole_images) == 8
