"""A one-parameter eps-model, eps_theta = w * x_t: it costs next to nothing, so timing a training
step with it times the diffusion ops alone (``fastddpm bench``'s train_step case and the demo's
"diffusion ops alone" figure)."""
import torch


class ScaleModel(torch.nn.Module):
    def __init__(self, w: float = 0.5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(float(w)))

    def forward(self, x, t):
        return self.w * x
