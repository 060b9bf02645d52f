import torch

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
