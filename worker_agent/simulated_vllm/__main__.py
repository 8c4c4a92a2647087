"""Entry point: ``python -m worker_agent.simulated_vllm`` (a simulated vLLM, see the package)."""

from worker_agent.simulated_vllm import main

raise SystemExit(main())
