def experience(self):
    """Print the registered objects of the loaded model."""
    for name, obj in self.model.state_dict().items():
        print(name, type(obj).__name__)
