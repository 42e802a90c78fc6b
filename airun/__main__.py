from airun.cli import main

raise SystemExit(main())
