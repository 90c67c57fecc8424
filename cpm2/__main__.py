from cpm2.cli import main

raise SystemExit(main())
