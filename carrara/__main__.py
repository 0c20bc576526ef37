from carrara.cli import main

raise SystemExit(main())
