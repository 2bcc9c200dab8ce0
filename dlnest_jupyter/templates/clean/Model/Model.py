import dlnest_jupyter


class Model(dlnest_jupyter.Model):
    def init(self, args, dataset_info):
        """Build your nn.Modules here and register them: self.net = self.register(MyNet())."""

    def init_optimizer(self):
        """Build optimizers/schedulers and register them: self.opt = self.register(torch.optim.Adam(...))."""

    def init_log(self):
        """Lists in this dict that grow are written to metrics.jsonl and plotted."""
        return {"loss": []}

    def run_one_step(self, batch, log, iter, epoch):
        """One training step on a batch (already on self.device)."""

    def validate(self, val_loader, log):
        """Evaluate and append results to log."""

    def visualize(self, log, iter, epoch):
        """Print or plot progress."""
