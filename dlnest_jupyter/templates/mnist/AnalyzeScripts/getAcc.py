import torch


def experience(self):
    """Accuracy of the loaded checkpoint on the validation set."""
    correct = total = 0
    with torch.no_grad():
        for x, y in self.val_loader:
            pred = self.model.net(x.to(self.device)).argmax(1)
            correct += (pred == y.to(self.device)).sum().item()
            total += y.numel()
    acc = correct / total
    print(f"validation accuracy at epoch {self.epoch}: {acc:.4f} ({correct}/{total})")
    return acc
