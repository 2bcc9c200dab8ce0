def experience(self):
    """Print the network and its size."""
    print(self.model.net)
    params = sum(p.numel() for p in self.model.net.parameters())
    print(f"{params:,} parameters")
