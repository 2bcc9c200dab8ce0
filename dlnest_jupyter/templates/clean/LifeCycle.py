import dlnest_jupyter


class LifeCycle(dlnest_jupyter.LifeCycle):
    def need_continue(self, epoch, log, args):
        return epoch < args["epochs"]
