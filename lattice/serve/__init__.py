"""Serving: the flat-tensor inference module, export (torch.export + AOTInductor) and the Predictor."""
