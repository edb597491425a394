"""MethodTrainer / TrainStep: iteration events, gradient accumulation, handler order, build_trainer checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from torch import nn

from medfusion.engines.method import Method
from medfusion.engines.trainer import MethodTrainer, build_trainer


class Regression(Method):
    """Least squares on ``batch["x"] -> batch["y"]``; records the events it sees."""

    name = "regression"

    def __init__(self, handlers=()):
        self._handlers = list(handlers)

    def loss_step(self, model, batch, engine):
        err = model(batch["x"]) - batch["y"]
        return {"loss": (err**2).mean(), "abs_error": err.abs().mean()}

    def handlers(self):
        return self._handlers


def batches(n: int, size: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(size, 4, generator=g), "y": torch.randn(size, 1, generator=g)} for _ in range(n)]


def trainer_for(net, data, max_epochs=1, accumulation_steps=1, handlers=(), method=None):
    return MethodTrainer(
        method=method or Regression(),
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        train_handlers=list(handlers),
        accumulation_steps=accumulation_steps,
    )


def manual_sgd(net, data, groups, acc, lr=0.1):
    """Plain PyTorch: for each group of batches, their losses' gradients divided by ``acc``, then one SGD step.

    As ``SupervisedTrainer``: a shorter group at the end of an epoch (a flush) is divided by ``acc`` too.
    """
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for group in groups:
        opt.zero_grad()
        for i in group:
            ((net(data[i]["x"]) - data[i]["y"]) ** 2).mean().div(acc).backward()
        opt.step()


@pytest.mark.parametrize(
    ("accumulation_steps", "groups"),
    [(1, [[0], [1], [2], [3], [4]]), (2, [[0, 1], [2, 3], [4]]), (5, [[0, 1, 2, 3, 4]])],
)
def test_accumulation_steps_match_a_plain_loop(accumulation_steps, groups):
    data = batches(5)
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    reference = nn.Linear(4, 1)
    reference.load_state_dict(net.state_dict())
    first_loss = float(((net(data[0]["x"]) - data[0]["y"]) ** 2).mean().detach())
    logged = []
    trainer = trainer_for(net, data, accumulation_steps=accumulation_steps)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logged.append(float(e.state.output["loss"])))
    trainer.run()
    manual_sgd(reference, data, groups, accumulation_steps)  # with 2 per step the last group is a flush of one batch
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert logged[0] == pytest.approx(first_loss)  # the batch's own loss, not divided by the accumulation steps


def test_accumulation_restarts_each_epoch():
    data = batches(3)
    torch.manual_seed(0)
    net, reference = nn.Linear(4, 1), nn.Linear(4, 1)
    reference.load_state_dict(net.state_dict())
    trainer_for(net, data, max_epochs=2, accumulation_steps=2).run()
    manual_sgd(reference, data, [[0, 1], [2], [0, 1], [2]], 2)
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_iteration_events_fire_in_supervised_trainers_order_with_the_losses_in_the_output():
    seen: list[tuple[str, tuple[str, ...]]] = []
    net = nn.Linear(4, 1)
    trainer = trainer_for(net, batches(2))
    for event in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):
        trainer.add_event_handler(event, lambda e, ev=event: seen.append((ev.name, tuple(sorted(e.state.output)))))
    trainer.run()
    names = [name for name, _ in seen]
    assert names == ["FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"] * 2
    assert all(keys == ("abs_error", "loss") for _, keys in seen)
    assert not trainer.state.output["loss"].requires_grad  # detached once the step is done


def test_method_handlers_run_before_the_train_handlers():
    order: list[str] = []

    class Mark:
        def __init__(self, name):
            self.name = name

        def attach(self, engine):
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: order.append(self.name))

    method = Regression(handlers=[Mark("method")])
    trainer = trainer_for(nn.Linear(4, 1), batches(1), handlers=[Mark("validation")], method=method)
    assert trainer.loss_function == method.loss_step  # the loss the iteration computes, not a placeholder
    trainer.run()
    assert order == ["method", "validation"]


def test_loss_function_and_iteration_update_are_refused():
    net = nn.Linear(4, 1)
    with pytest.raises(TypeError, match="loss_function"):
        MethodTrainer(Regression(), "cpu", 1, batches(1), net, torch.optim.SGD(net.parameters(), lr=0.1),
                      loss_function=nn.MSELoss())  # fmt: skip
    with pytest.raises(ValueError, match="accumulation_steps"):
        trainer_for(net, batches(1), accumulation_steps=0)


def test_build_trainer_writes_the_bundles_checkpoints_and_resumes(tmp_path):
    data = batches(2)
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    build_trainer(net, Regression(), data, max_epochs=2, device="cpu", output_dir=tmp_path, seed=3).run()
    assert [p.name for p in tmp_path.iterdir()] == ["last_checkpoint_epoch=2.pt"]  # atomic: no temp files left
    ckpt = torch.load(tmp_path / "last_checkpoint_epoch=2.pt", weights_only=True)
    assert {"model", "optimizer", "method", "trainer"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 4  # 2 epochs of 2 batches
    with pytest.raises(FileExistsError, match="already holds a run"):
        build_trainer(nn.Linear(4, 1), Regression(), data, max_epochs=3, device="cpu", output_dir=tmp_path)
    resumed = nn.Linear(4, 1)
    trainer = build_trainer(resumed, Regression(), data, max_epochs=3, device="cpu", output_dir=tmp_path, resume=True)
    trainer.run()
    assert trainer.state.epoch == 3 and trainer.state.iteration == 6
    assert [p.name for p in tmp_path.iterdir()] == ["last_checkpoint_epoch=3.pt"]


@pytest.mark.parametrize(("log_every", "lines"), [(1, 4), (2, 2), (0, 0)])
def test_build_trainer_logs_the_loss_every_log_every_iterations(caplog, log_every, lines):
    trainer = build_trainer(nn.Linear(4, 1), Regression(), batches(4), max_epochs=1, device="cpu", log_every=log_every)
    with caplog.at_level(logging.INFO, logger="medfusion.train"):
        trainer.run()
    assert sum("train_loss" in r.getMessage() for r in caplog.records if r.name == "medfusion.train") == lines
