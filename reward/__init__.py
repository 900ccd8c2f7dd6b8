"""Social Reward critic: open_clip CLIP fine-tuned on community preference pairs."""

from reward.model import CriticConfig, SocialReward, create_critic, load

__all__ = ["CriticConfig", "SocialReward", "create_critic", "load"]
