"""The agent side: the reference agent's rollout loop and prompts, module
functions played as macros in the sandbox, the checks a proposed function must
pass, held-out evaluation, the oracle behaviour policy, and the environments
(``agent.envs``)."""
