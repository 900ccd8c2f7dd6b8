"""The toy world: procedural scenes, their prompts, a pixel checker, a hidden-taste oracle and a
simulated community whose remixes become Social Reward pairs. The offline default world.

Importing the package is free of side effects and of torch; `toyworld.pretrain_clip` needs torch.
"""

from toyworld.world import Scene, parse_prompt, sample_scene, scene_to_prompt, split_prompts

__all__ = ["Scene", "parse_prompt", "sample_scene", "scene_to_prompt", "split_prompts"]
