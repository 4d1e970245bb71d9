from visionmoe.cli.main import main

raise SystemExit(main())
