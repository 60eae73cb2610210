"""``apex.contrib.transducer`` is not provided: importing it raises ``ApexModuleNotProvided`` naming the replacement."""
from ampcompat._not_provided import refuse_import

refuse_import(__name__)
