import dlnest_jupyter


class LifeCycle(dlnest_jupyter.LifeCycle):
    def __init__(self):
        self.best_acc = 0.0

    def need_visualize(self, epoch, iter, log, args):
        return iter % args["freq"]["visualize_every"] == 0

    def need_save(self, epoch, log, args):
        return epoch % args["freq"]["save_every"] == 0

    def hold_checkpoint(self, epoch, log, args):
        """Keep the best validation accuracy's checkpoint for good."""
        if log["acc"] and log["acc"][-1] > self.best_acc:
            self.best_acc = log["acc"][-1]
            return True
        return False

    def need_continue(self, epoch, log, args):
        return epoch < args["epochs"]

    def after_all(self):
        print(f"best validation accuracy: {self.best_acc:.4f}")

    def state_dict(self):
        return {"best_acc": self.best_acc}

    def load_state_dict(self, state):
        self.best_acc = state["best_acc"]
