import dlnest_jupyter


class Dataset(dlnest_jupyter.Dataset):
    def init(self, args):
        """Return (info, train_loader, val_loader). Use self.sampler(ds, shuffle) so DDP shards your data."""
        info = {}
        return info, [], []
