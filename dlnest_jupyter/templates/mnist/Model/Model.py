import torch
import torch.nn.functional as F

import dlnest_jupyter
from Model.MNISTCNN import MNISTCNN


class Model(dlnest_jupyter.Model):
    def init(self, args, dataset_info):
        cfg = args["model"]
        self.net = self.register(
            MNISTCNN(dataset_info["num_classes"], cfg["hidden"], cfg["dropout"]), "net"
        )

    def init_optimizer(self):
        lr = self.args["model"]["lr"]
        self.optimizer = self.register(torch.optim.Adam(self.net.parameters(), lr=lr), "optimizer")
        self.scheduler = self.register(
            torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=4, gamma=0.5), "scheduler"
        )

    def init_log(self):
        return {"loss": [], "acc": []}

    def run_one_step(self, batch, log, iter, epoch):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        log["loss"].append(self.reduce_mean(loss.detach()).item())

    def validate(self, val_loader, log):
        correct = total = 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = self.to_device((x, y))
                correct += (self.net(x).argmax(1) == y).sum().item()
                total += y.numel()
        log["acc"].append(self.reduce_mean(torch.tensor(correct / max(total, 1))).item())
        self.scheduler.step()

    def visualize(self, log, iter, epoch):
        recent = log["loss"][-20:]
        print(f"epoch {epoch} iter {iter}: loss {sum(recent) / len(recent):.4f}")
